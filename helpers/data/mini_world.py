"""The synthetic multi-hop "mini world" behind the mini profile (introduced in 02_corpus_indexing).

People, places, organisations and works are linked by relations written into their abstracts, so a
claim about a film and a record label can hinge on a director the claim never names: that page is
found only by reading the film's abstract, where the director's title appears verbatim. The output
matches the real downloads byte-for-byte in format: ``wiki.abstracts.2017.jsonl`` inside a
``.tar.gz`` and HoVer-schema parquet files in a Hugging Face dataset folder. Same seed, same bytes.
"""

import gzip
import io
import json
import random
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from helpers.util import atomic

CORPUS_ARCHIVE = "wiki.abstracts.2017.tar.gz"
CORPUS_MEMBER = "wiki.abstracts.2017.jsonl"
HOVER_FOLDER = "hover-parquet"
HOVER_FILES = {
    "train": "data/train-00000-of-00001.parquet",
    "validation": "data/validation-00000-of-00001.parquet",
}

# How many entities of each kind; distractor pages bring the corpus past 20,000 abstracts.
SIZES = dict(regions=40, cities=800, people=7000, orgs=2500, works=7000, festivals=3000)
# Claims per split: unique 3-hop chains (a third get a second claim with the same hpqa_id), 2- and 4-hop.
CLAIMS = {"train": dict(hop3=1450, hop2=700, hop4=350), "validation": dict(hop3=250, hop2=150, hop4=80)}

_ONSETS = "b br c d dr f g gr h k l m n p r s st t tr v z sh j w".split()
_VOWELS = "a e i o u a e o a i".split()
_CODAS = ["", "", "", "n", "r", "l", "s", "nd", "m"]
_ADJECTIVES = (
    "silent golden broken hidden distant crimson quiet bitter northern southern burning frozen "
    "endless hollow wild last first lonely iron silver dark bright gentle savage lost secret "
    "sacred painted falling rising wandering sleeping ancient restless velvet scarlet pale"
).split()
_NOUNS = (
    "harbor river garden mirror kingdom shadow storm winter summer island mountain city road "
    "crown letter song voice empire forest tide bridge tower window night dawn journey machine "
    "orchard lantern fortress valley desert ocean comet ember harvest compass ladder"
).split()
_OCCUPATIONS = {
    "film": ("film director", "directed by", "director", "Pictures", "film studio", "produced"),
    "novel": ("novelist", "written by", "author", "Press", "publishing house", "published"),
    "album": ("singer-songwriter", "recorded by", "performer", "Records", "record label", "released"),
    "painting": ("painter", "painted by", "painter", "Gallery", "art gallery", "acquired"),
}
_GENRES = {
    "film": "drama comedy thriller documentary western musical".split(),
    "novel": "historical fantasy crime adventure romance".split(),
    "album": "folk jazz rock pop electronic".split(),
    "painting": "landscape portrait still-life allegorical".split(),
}
_REGION_KINDS = ["Province", "Valley", "Coast", "Highlands"]


@dataclass
class Page:
    title: str
    text: list = field(default_factory=list)


def _word(rng, syllables):
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _a(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _plural(noun):
    return noun[:-1] + "ies" if noun.endswith("y") else noun + "s"


def _unique_words(rng, count, syllables, taken):
    out = []
    while len(out) < count:
        w = _word(rng, rng.choice(syllables))
        if w not in taken and len(w) > 3:
            taken.add(w)
            out.append(w)
    return out


class _Builder:
    """Builds entities, their abstracts and the claims over them, all from one seeded RNG."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.pages = {}  # title -> Page, insertion-ordered
        self.entities = {}  # title -> dict of facts

    def add(self, title, kind, sentences, **facts):
        assert title not in self.pages, title
        self.pages[title] = Page(title, sentences)
        self.entities[title] = dict(kind=kind, **facts)

    def build(self):
        rng, taken = self.rng, set()
        firsts = _unique_words(rng, 420, (1, 2), taken)
        surnames = _unique_words(rng, 900, (2,), taken)
        places = _unique_words(rng, SIZES["cities"] + SIZES["regions"], (2,), taken)
        rivers = _unique_words(rng, 120, (2,), taken)
        self.regions = [f"{w} {rng.choice(_REGION_KINDS)}" for w in places[: SIZES["regions"]]]
        for region in self.regions:
            self.add(region, "region", [f"{region} is a region in the north of the Republic of Aldmere.",
                                        f"Its capital lies on the {rng.choice(rivers)} River."])
        self.cities = []
        for w in places[SIZES["regions"]:]:
            city = w if rng.random() < 0.6 else f"{rng.choice(['Port', 'New', 'Upper', 'Lower'])} {w}"
            region = rng.choice(self.regions)
            self.cities.append(city)
            self.add(city, "city", [f"{city} is a town in {region}.",
                                    f"It lies on the {rng.choice(rivers)} River and has about "
                                    f"{rng.randrange(2, 400) * 1000:,} inhabitants."], region=region)
        self._people(firsts, surnames)
        self._orgs(surnames)
        self._works()
        self._festivals()

    def _people(self, firsts, surnames):
        rng = self.rng
        self.people, self.people_by_city, seen = [], {}, set()
        universities = [f"University of {c}" for c in rng.sample(self.cities, 60)]
        self.universities = universities
        for uni in universities:
            city = uni.removeprefix("University of ")
            self.add(uni, "org", [f"{uni} is a public university founded in {rng.randrange(1700, 1990)}.",
                                  f"It is headquartered in {city}."], city=city, org_kind="university")
        while len(self.people) < SIZES["people"]:
            name = f"{rng.choice(firsts)} {rng.choice(surnames)}"
            if name in seen:
                continue
            seen.add(name)
            work_kind = rng.choice(list(_OCCUPATIONS))
            city, uni = rng.choice(self.cities), rng.choice(universities)
            pron = rng.choice(["He", "She"])
            surname = name.split()[-1]
            extra = f"{pron} is known for {rng.choice(_ADJECTIVES)} {_plural(rng.choice(_NOUNS))} and {_plural(rng.choice(_NOUNS))}."
            self.add(name, "person", [f"{name} (born {rng.randrange(1900, 1995)}) is a {_OCCUPATIONS[work_kind][0]}.",
                                      f"{pron} was born in {city}.",
                                      f"{surname} studied at {uni}.", extra],
                     city=city, university=uni, work_kind=work_kind)
            self.people.append(name)
            self.people_by_city.setdefault(city, []).append(name)

    def _orgs(self, surnames):
        rng = self.rng
        self.orgs_by_kind, self.orgs_by_city = {k: [] for k in _OCCUPATIONS}, {}
        count = 0
        while count < SIZES["orgs"] - len(self.universities):
            work_kind = rng.choice(list(_OCCUPATIONS))
            suffix, desc = _OCCUPATIONS[work_kind][3], _OCCUPATIONS[work_kind][4]
            city = rng.choice(self.cities)
            style = rng.random()
            if style < 0.4:
                name = f"{rng.choice(surnames)} {suffix}"
            elif style < 0.7:
                name = f"{city} {suffix}"
            else:
                name = f"{rng.choice(_ADJECTIVES).capitalize()} {rng.choice(_NOUNS).capitalize()} {suffix}"
            if name in self.pages:
                continue
            sentences = [f"{name} is a {desc} founded in {rng.randrange(1900, 2010)}.", f"It is headquartered in {city}."]
            if rng.random() < 0.5:
                sentences.append(f"{name} was founded by {rng.choice(self.people)}.")
            self.add(name, "org", sentences, city=city, org_kind=work_kind)
            self.orgs_by_kind[work_kind].append(name)
            self.orgs_by_city.setdefault(city, []).append(name)
            count += 1

    def _works(self):
        rng = self.rng
        self.works = []
        creators = {k: [p for p in self.people if self.entities[p]["work_kind"] == k] for k in _OCCUPATIONS}
        while len(self.works) < SIZES["works"]:
            adj, noun, noun2 = rng.choice(_ADJECTIVES).capitalize(), rng.choice(_NOUNS).capitalize(), rng.choice(_NOUNS).capitalize()
            title = rng.choice([f"The {adj} {noun}", f"{adj} {noun}", f"{noun} of {rng.choice(self.cities)}",
                                f"{noun} and {noun2}", f"The {noun} of {adj} {_plural(noun2)}"])
            if title in self.pages or noun == noun2:
                continue
            kind = rng.choice(list(_OCCUPATIONS))
            _, by, _, _, _, verb = _OCCUPATIONS[kind]
            creator, org = rng.choice(creators[kind]), rng.choice(self.orgs_by_kind[kind])
            year = rng.randrange(1930, 2017)
            self.add(title, "work", [f"{title} is a {year} {rng.choice(_GENRES[kind])} {kind} {by} {creator}.",
                                     f"It was {verb} by {org}.",
                                     f"The {kind} tells the story of {_a(rng.choice(_NOUNS))} near {rng.choice(self.cities)}."],
                     creator=creator, org=org, work_kind=kind)
            self.works.append(title)

    def _festivals(self):
        rng = self.rng
        made = 0
        while made < SIZES["festivals"]:
            city = rng.choice(self.cities)
            title = f"{city} {rng.choice(_ADJECTIVES).capitalize()} {rng.choice(['Festival', 'Prize', 'Fair', 'Biennale'])}"
            if title in self.pages:
                continue
            w1, w2, person = rng.choice(self.works), rng.choice(self.works), rng.choice(self.people)
            self.add(title, "festival", [f"The {title} is an annual arts event held in {city}.",
                                         f"Past editions featured {w1} and {w2}.",
                                         f"Its jury was once chaired by {person}."], city=city)
            made += 1


def _role(kind):
    return _OCCUPATIONS[kind][2]


class _Claims:
    """HoVer-style claims over the world; every 3-hop claim hides at least one gold page."""

    def __init__(self, b: _Builder):
        self.b, self.rng = b, b.rng
        self.anchors = b.rng.sample(b.works, len(b.works))
        self.next_id = 0

    def _anchor(self):
        return self.anchors.pop()

    def _ids(self):
        return "5a" + "%022x" % self.rng.getrandbits(88)

    def _row(self, claim, facts, label, hops, hpqa_id):
        self.next_id += 1
        return dict(id=self.next_id, uid=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)), claim=claim,
                    supporting_facts=[dict(key=k, value=v) for k, v in facts], label=label, num_hops=hops,
                    hpqa_id=hpqa_id)

    def hop3(self):
        """One 3-hop chain -> one or two claims sharing its hpqa_id."""
        b, rng = self.b, self.rng
        while True:
            work = self._anchor()
            w = b.entities[work]
            creator, org = w["creator"], w["org"]
            c = b.entities[creator]
            pattern = rng.choices(["org_city", "alma", "born_where_released", "region"], [35, 20, 30, 15])[0]
            variants = []
            if pattern == "org_city":
                same = [o for o in b.orgs_by_city.get(c["city"], []) if o != org]
                others = [o for o in rng.sample(b.orgs_by_kind[rng.choice(list(_OCCUPATIONS))], 5)
                          if b.entities[o]["city"] != c["city"]]
                if not same or not others:
                    continue
                facts = [(work, 0), (creator, 1), (None, 1)]
                for named, label in ((rng.choice(same), 1), (others[0], 0)):
                    text = rng.choice(["The {r} of {w} was born in the town where {o} is headquartered.",
                                       "{w}'s {r} was born in the same town that is home to {o}."])
                    variants.append((text.format(r=_role(w["work_kind"]), w=work, o=named), _fill(facts, named), label))
            elif pattern == "alma":
                wrong = rng.choice([u for u in b.universities if u != c["university"]])
                facts = [(work, 0), (creator, 2), (None, 0)]
                for named, label in ((c["university"], 1), (wrong, 0)):
                    text = rng.choice(["{w} was made by a {r} who studied at {u}.",
                                       "The {r} of {w} is an alumnus of {u}."])
                    variants.append((text.format(w=work, r=_role(w["work_kind"]), u=named), _fill(facts, named), label))
            elif pattern == "born_where_released":
                city = b.entities[org]["city"]
                natives = [p for p in b.people_by_city.get(city, []) if p != creator]
                strangers = [p for p in rng.sample(b.people, 5) if b.entities[p]["city"] != city]
                if not natives or not strangers:
                    continue
                facts = [(work, 1), (org, 1), (None, 1)]
                for named, label in ((rng.choice(natives), 1), (strangers[0], 0)):
                    text = rng.choice(["{w} was {v} by a company based in the birthplace of {p}.",
                                       "The company that {v} {w} is headquartered in the town where {p} was born."])
                    variants.append((text.format(w=work, v=_OCCUPATIONS[w["work_kind"]][5], p=named), _fill(facts, named), label))
            else:
                city = c["city"]
                region = b.entities[city]["region"]
                wrong = rng.choice([r for r in b.regions if r != region])
                facts = [(work, 0), (creator, 1), (city, 0)]
                for named, label in ((region, 1), (wrong, 0)):
                    text = rng.choice(["The {r} of {w} was born in a town in {g}.", "{w} was made by a {r} born in {g}."])
                    variants.append((text.format(r=_role(w["work_kind"]), w=work, g=named), facts, label))
            hpqa_id = self._ids()
            rng.shuffle(variants)
            keep = variants if rng.random() < 0.3 else variants[:1]
            return [self._row(t, f, lab, 3, hpqa_id) for t, f, lab in keep]

    def hop2(self):
        b, rng = self.b, self.rng
        work = self._anchor()
        w = b.entities[work]
        creator = w["creator"]
        city = b.entities[creator]["city"]
        label = int(rng.random() < 0.5)
        named = city if label else rng.choice(b.cities)
        claim = f"{work} was {_OCCUPATIONS[w['work_kind']][1]} someone born in {named}."
        return [self._row(claim, [(work, 0), (creator, 1)], label, 2, self._ids())]

    def hop4(self):
        b = self.b
        work = self._anchor()
        w = b.entities[work]
        creator, org = w["creator"], w["org"]
        city = b.entities[creator]["city"]
        org_city = b.entities[org]["city"]
        label = int(b.entities[city]["region"] == b.entities[org_city]["region"])
        claim = (f"The {_role(w['work_kind'])} of {work} was born in the same region where the company that "
                 f"{_OCCUPATIONS[w['work_kind']][5]} it is headquartered.")
        facts = [(work, 0), (creator, 1), (city, 0), (org, 1), (org_city, 0)]
        return [self._row(claim, facts, label, 4, self._ids())]


def _fill(facts, named):
    return [(named if k is None else k, v) for k, v in facts]


@dataclass
class World:
    pages: list  # [Page]
    claims: dict  # split -> [row dict]


def generate(seed: int = 0) -> World:
    """Build the whole world in memory (about 2 s)."""
    b = _Builder(seed)
    b.build()
    maker = _Claims(b)
    claims = {}
    for split, counts in CLAIMS.items():
        rows = []
        for _ in range(counts["hop3"]):
            rows += maker.hop3()
        for _ in range(counts["hop2"]):
            rows += maker.hop2()
        for _ in range(counts["hop4"]):
            rows += maker.hop4()
        b.rng.shuffle(rows)
        claims[split] = rows
    pages = list(b.pages.values())
    b.rng.shuffle(pages)
    return World(pages=pages, claims=claims)


def corpus_archive_bytes(world: World) -> bytes:
    """The abstracts as ``wiki.abstracts.2017.jsonl`` inside a reproducible ``.tar.gz``."""
    jsonl = "".join(json.dumps({"title": p.title, "text": p.text}, ensure_ascii=False) + "\n" for p in world.pages)
    payload = jsonl.encode("utf-8")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(CORPUS_MEMBER)
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        tar.addfile(info, io.BytesIO(payload))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _hover_features():
    from datasets import ClassLabel, Features, Value

    return Features({
        "id": Value("int32"),
        "uid": Value("string"),
        "claim": Value("string"),
        "supporting_facts": [{"key": Value("string"), "value": Value("int32")}],
        "label": ClassLabel(names=["NOT_SUPPORTED", "SUPPORTED"]),
        "num_hops": Value("int32"),
        "hpqa_id": Value("string"),
    })


def publish(dest: Path, seed: int = 0, expected: dict | None = None) -> dict:
    """Write the world where the mini profile "downloads" it from; returns {name: path}.

    Files already there are kept, unless ``expected`` ({path relative to ``dest``: sha256}) says one
    is damaged: the world is ours, so it is generated again and rewritten.
    """
    from datasets import Dataset
    import datasets as hf_datasets

    from helpers.data.downloads import sha256_of

    dest = Path(dest)
    archive = dest / CORPUS_ARCHIVE
    hover = dest / HOVER_FOLDER
    wanted = [archive] + [hover / rel for rel in HOVER_FILES.values()]
    intact = all(p.is_file() for p in wanted) and all(
        sha256_of(dest / rel) == sha for rel, sha in (expected or {}).items() if sha)
    if intact:
        return {"corpus": archive, "hover": hover}
    world = generate(seed)
    atomic.write_bytes(archive, corpus_archive_bytes(world))
    bars_were_on = not hf_datasets.are_progress_bars_disabled()
    hf_datasets.disable_progress_bars()
    try:
        for split, rel in HOVER_FILES.items():
            with atomic.atomic_path(hover / rel, suffix=".parquet") as tmp:
                Dataset.from_list(world.claims[split], features=_hover_features()).to_parquet(str(tmp))
    finally:
        if bars_were_on:
            hf_datasets.enable_progress_bars()
    return {"corpus": archive, "hover": hover}
