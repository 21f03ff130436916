"""Regulatory context: a data-driven reference mapping by classification and jurisdiction."""

from __future__ import annotations

import json

import pytest

from agent.cdp.canonical import canonical_json
from agent.config import CLASSIFICATIONS, JURISDICTIONS
from agent.regulatory import DATA_FILE, regulatory_context


def _regs(ctx, step=None) -> set[str]:
    return {f["regulation"].split(" (")[0] for m in ctx["mappings"]
            if step is None or m["step"] == step for f in m["frameworks"]}


def _provs(ctx, step) -> set[str]:
    return {f["provision"] for m in ctx["mappings"] if m["step"] == step for f in m["frameworks"]}


@pytest.mark.parametrize("cls", CLASSIFICATIONS)
@pytest.mark.parametrize("jur", JURISDICTIONS)
def test_shape_for_every_combination(cls, jur):
    """Every class × jurisdiction gives 8 mappings in step order, all related_to, SOC 2 always present."""
    ctx = regulatory_context(cls, jur)
    assert set(ctx) == {"notice", "framework_version", "mappings"}
    assert [m["step"] for m in ctx["mappings"]] == list(range(1, 9))
    assert ctx["mappings"][7]["subsystem"] == "session_destroy"
    for m in ctx["mappings"]:
        assert m["frameworks"], m
        for f in m["frameworks"]:
            assert set(f) == {"regulation", "provision", "description", "relationship"}
            assert f["relationship"] == "related_to"
    assert "SOC 2 Trust Services Criteria" in _regs(ctx)
    canonical_json(ctx)  # JSON-safe, no floats


def test_phi_us_has_hipaa_disposal():
    """PHI relates step 3 to HIPAA §164.310(d)(2)(i) (the SPEC's example) and SOC 2 CC6.5."""
    ctx = regulatory_context("PHI", "US")
    assert {"§164.310(d)(2)(i)", "CC6.5"} <= _provs(ctx, 3)
    assert "GDPR" not in _regs(ctx)


def test_eu_has_gdpr_erasure():
    """EU relates the wipe steps to GDPR Art. 17(1); general data gets no HIPAA."""
    ctx = regulatory_context("general", "EU")
    assert "Art. 17(1)" in _provs(ctx, 3) and "Art. 17(1)" in _provs(ctx, 2)
    assert "HIPAA Security Rule" not in _regs(ctx)


def test_uk_has_uk_gdpr_not_eu():
    """UK sessions map to UK GDPR, not the EU regulation."""
    regs = _regs(regulatory_context("PII", "UK"))
    assert "UK GDPR" in regs and "GDPR" not in regs


def test_financial_us_has_glba_and_pci():
    """Financial data in the US maps to the GLBA Safeguards Rule and PCI DSS."""
    ctx = regulatory_context("financial", "US")
    assert "§314.4(c)(6)(i)" in _provs(ctx, 2)
    assert "Req. 9.4.7" in _provs(ctx, 2)


def test_financial_eu_has_pci_not_glba():
    """PCI DSS applies everywhere; GLBA only in the US."""
    regs = _regs(regulatory_context("financial", "EU"))
    assert "PCI DSS v4.0.1" in regs and "GLBA Safeguards Rule" not in regs


def test_wipe_steps_have_nist_800_88():
    """The wipe and verification steps relate to NIST SP 800-88."""
    ctx = regulatory_context("general", "OTHER")
    for step in (2, 3, 6):
        assert "NIST SP 800-88 Rev. 1" in _regs(ctx, step)


@pytest.mark.parametrize("jur,reg,prov", [("CA", "PIPEDA", "Principle 4.5.3"),
                                          ("AU", "Privacy Act 1988", "APP 11.2"),
                                          ("IN", "Digital Personal Data Protection Act", "Section 8(7)")])
def test_other_jurisdictions(jur, reg, prov):
    """Canada, Australia and India get their privacy laws' disposal provisions on step 2."""
    ctx = regulatory_context("PII", jur)
    step2 = [f for f in ctx["mappings"][1]["frameworks"] if f["regulation"].startswith(reg)]
    assert [f["provision"] for f in step2] == [prov]


def test_notice_disclaims_certification_and_states_limits():
    """The notice says it is not a certification and states SPEC 13's limits plainly."""
    notice = regulatory_context("general", "US")["notice"]
    assert "not a compliance certification" in notice
    assert "init_on_free" in notice and "hardware" in notice
    assert "pipe and socket buffers" in notice and "not drained" in notice


def test_result_is_a_copy():
    """Changing a returned context does not change the next one."""
    a = regulatory_context("PHI", "US")
    a["mappings"][0]["frameworks"].clear()
    assert regulatory_context("PHI", "US")["mappings"][0]["frameworks"]


def test_data_file_is_data():
    """The mapping lives in a JSON data file with a framework_version."""
    data = json.loads(DATA_FILE.read_text())
    assert data["framework_version"] and data["frameworks"]
