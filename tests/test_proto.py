"""The generated stubs in metaopt/_proto/ are what scripts/gen_proto.py makes today."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    fresh = {p.name: p.read_text() for p in gen_proto.generate(tmp_path)}
    committed = ROOT / "metaopt" / "_proto"
    assert fresh, "no stubs were generated"
    for name, text in fresh.items():
        assert (committed / name).read_text() == text, f"{name} is stale: run `make proto`"
