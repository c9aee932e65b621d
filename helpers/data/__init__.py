"""Where the data comes from: downloads (resume, sha256), the generated mini world, the abstracts, HoVer (02, 03)."""
