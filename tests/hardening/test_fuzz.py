"""Schemathesis against the server's own OpenAPI document (server/openapi.py), a bounded number of examples
per operation, positive and negative, on the shared real-engine server: no 5xx, every status documented,
every body matching its schema and content type, schema-invalid requests refused. Half of the generated
bodies name a real model, so the fuzz reaches the engine and not only the 404 path. The longer run is
`python bench/fuzz.py`."""
from __future__ import annotations

import importlib.util
import sys

import schemathesis
from hypothesis import HealthCheck, settings

from server.app import build_app
from server.settings import ServerSettings
from tests.conftest import REPO_ROOT
from tests.hardening.conftest import BASE, KEY
from tests.server.fake_engine import FakeEngine

spec = importlib.util.spec_from_file_location("bench_fuzz", REPO_ROOT / "bench" / "fuzz.py")
bench_fuzz = sys.modules.setdefault("bench_fuzz", importlib.util.module_from_spec(spec))
spec.loader.exec_module(bench_fuzz)

EXAMPLES = 12  # per operation and generation mode
schema = schemathesis.openapi.from_dict(build_app(FakeEngine(), ServerSettings(api_keys=[KEY])).openapi())
schema.config.update(request_timeout=120)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
def test_api_conforms_to_its_schema(case, hardened):
    bench_fuzz.aim_at_real_models(case, (BASE, "pre8", "proj"), max_new=8)
    case.call_and_validate(base_url=hardened.url, headers={"Authorization": f"Bearer {KEY}"},
                           checks=bench_fuzz.checks())
