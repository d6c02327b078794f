"""The method studies: a declarative grid of variants each, trained and reported by
``cdsr study run NAME`` / ``cdsr study report NAME`` (see :mod:`cdsr.studies.grid`)."""

from __future__ import annotations

from cdsr.studies import autocdsr, dpg, gca, hstu_cd, quality
from cdsr.studies.grid import Study, StudyError

STUDIES: dict[str, Study] = {
    "hstu_cd": hstu_cd.STUDY,
    "gca": gca.STUDY,
    "autocdsr": autocdsr.STUDY,
    "dpg": dpg.STUDY,
    "quality": quality.STUDY,
}


def get(name: str) -> Study:
    if name not in STUDIES:
        raise StudyError(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
    return STUDIES[name]
