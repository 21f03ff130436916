"""Regulatory context of a destroy result (SPEC 6): provisions *related* to each step's
evidence, chosen by data classification and jurisdiction from `agent/data/regulatory.json`.

A reference mapping, not a compliance certification: `relationship` is always
`related_to` and `notice` says so (and states the limits of SPEC 13).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

from agent.cdp.chain import STEPS
from agent.config import CLASSIFICATIONS, JURISDICTIONS

__all__ = ["DATA_FILE", "load", "regulatory_context"]

DATA_FILE = Path(__file__).resolve().parent / "data" / "regulatory.json"
RELATIONSHIP = "related_to"


@functools.lru_cache(maxsize=1)
def load(path: str | None = None) -> dict:
    """The parsed data file (validated: known steps, classes and jurisdictions)."""
    with open(path or DATA_FILE, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("relationship", RELATIONSHIP) != RELATIONSHIP:
        raise ValueError("regulatory data: relationship must be related_to")
    for fw in data["frameworks"]:
        for c in fw["classifications"]:
            if c != "*" and c not in CLASSIFICATIONS:
                raise ValueError(f"regulatory data: unknown classification {c}")
        for j in fw["jurisdictions"]:
            if j != "*" and j not in JURISDICTIONS:
                raise ValueError(f"regulatory data: unknown jurisdiction {j}")
        for step in fw["provisions"]:
            if not 1 <= int(step) <= len(STEPS):
                raise ValueError(f"regulatory data: unknown step {step}")
    return data


def _applies(values: list[str], value: str) -> bool:
    return "*" in values or value in values


def regulatory_context(classification: str, jurisdiction: str) -> dict:
    """`{notice, framework_version, mappings: [{step, subsystem, frameworks: [{regulation,
    provision, description, relationship}]}]}`, one mapping per step in order."""
    data = load()
    chosen = [fw for fw in data["frameworks"]
              if _applies(fw["classifications"], classification)
              and _applies(fw["jurisdictions"], jurisdiction)]
    mappings = []
    for step, subsystem, _operation in STEPS:
        frameworks = [{"regulation": fw["regulation"], "provision": prov,
                       "description": desc, "relationship": RELATIONSHIP}
                      for fw in chosen for prov, desc in fw["provisions"].get(str(step), [])]
        mappings.append({"step": step, "subsystem": subsystem, "frameworks": frameworks})
    return copy.deepcopy({"notice": data["notice"], "framework_version": data["framework_version"],
                          "mappings": mappings})
