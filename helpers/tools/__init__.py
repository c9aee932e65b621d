"""Maintainer tooling: the headless notebook runner behind `make tutorial` and `make notebooks`."""
