"""The official Nanorix verifier (test-only dependency) accepts the 2.1 rendition of proofs
from real sessions: general and PHI, clean and with a failed destruction step."""

from __future__ import annotations

import pytest
from nanorix.debug import verify_auditproof as official_staged
from nanorix.verifier import verify as official_verify
from test_destroy_pipeline import engine, make_ctx, new_id, signer  # noqa: F401 (fixture)

from agent.cdp.auditproof import build_auditproof
from agent.cdp.verify import verify
from agent.destroy import DestroyHooks, run_pipeline
from agent.service.proofs import sign_cdp

PASSES = {"general": ["zeros"], "PHI": ["random", "ones", "zeros"]}


@pytest.mark.parametrize("fail_step", [None, 3])
@pytest.mark.parametrize("classification", ["general", "PHI"])
async def test_official_verifier_accepts_real_session_rendition(engine, classification,  # noqa: F811
                                                                 fail_step):
    """A real sandbox runs a command, is destroyed (optionally with step 3 failing), and the
    rendition passes the official verifier at stage >= 7 and ours; the v1.0 CDP verifies."""
    sb = await engine.create(new_id(), tier="tiny", classification=classification)
    r = await sb.exec("echo secret > /work/f && cat /work/f", timeout=10)
    assert r.exit_code == 0
    hooks = DestroyHooks(fail_step=fail_step) if fail_step else None
    ctx = make_ctx(sb, passes=PASSES[classification], classification=classification,
                   hooks=hooks, timeout=1.0)
    outcome = await run_pipeline(ctx)
    assert outcome.status == ("expired_unclean" if fail_step else "destroyed")
    key = signer()
    cdp = sign_cdp(outcome, key)
    rendition = build_auditproof(signer=key, customer_id="cust-real", jurisdiction="US",
                                 authority_id="nrx-node:test", signing_key_version=1,
                                 exec_count=1, region=None, cdp_v1=cdp)
    assert verify(cdp)["valid"] is True
    assert verify(rendition)["valid"] is True
    assert official_verify(rendition).ok is True
    assert official_staged(rendition).stage_reached >= 7
    assert rendition["destruction_state"] == ("incomplete" if fail_step else "complete")

    tampered = dict(rendition, capsule_id="sess_0000000000000000")
    assert official_verify(tampered).ok is False
    assert verify(tampered)["valid"] is False
