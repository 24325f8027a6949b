"""Fixtures shared by test files: `pki`, certificates for TLS tests, made here with
`cryptography` (EC P-256 keys: fast). And, below, the checkout's helpers on the import path, one
JAX compilation cache for the whole run, and which files may run beside others."""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import pathlib
import shutil
import sys
import tempfile
import types

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# --- the import path ------------------------------------------------------------------------
# The repository root stays off sys.path, so tests import metaopt as a user's environment has it:
# `metaopt.task_zoo`, `metaopt.learner`, never a second, top-level `task_zoo` with its own registry.
# The checkout's own helpers, tests/ and benchmarks/ (not installed), are reached as packages by
# their folders alone.
ROOT = pathlib.Path(__file__).resolve().parent.parent
for _name in ("tests", "benchmarks"):
    if _name not in sys.modules:
        sys.modules[_name] = types.ModuleType(_name)
        sys.modules[_name].__path__ = [str(ROOT / _name)]

# --- one compilation cache for the run -------------------------------------------------------
# Tests compile the same programs again and again, in this process (a fresh jax.jit per test) and
# in others (the CLI's, a learner's, every Ray worker's). JAX's persistent cache, new for each run
# and passed to every process through the environment, compiles each program once: the default
# suite took 1,269 s instead of 1,510 s with it (2026-12-06, this 2-core VM). Every program, however
# small: each CLI subprocess compiles many small ones as it starts (two sets of files took 81 s and
# 53 s so, against 93 s and 63 s with only programs of 0.1 s or more kept). It is made here, before
# anything imports jax. A test that counts compilations counts the cache's hits too.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="metaopt-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
if "PYTEST_XDIST_WORKER" in os.environ:
    # One cache per test process under `make test`'s two: JAX writes an entry in place, so the
    # other process could read it half written (a warning, which fails a test here).
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"],
                                                           os.environ["PYTEST_XDIST_WORKER"])

# --- two test processes ----------------------------------------------------------------------
# `make test` runs two test processes (pytest-xdist, `-n 2`): the default suite took 738 s instead
# of about 1,150 s on this 2-core VM (one run each, 2026-12-06). The files below compute in their
# own process only (no Ray, learners, workers, servers, ports or clocks): each is a unit of its
# own, run beside whatever else runs. Every other file is in one unit, "services", run in one
# process, file after file as without xdist: real clusters and workers claim the machine's cores,
# and their timeouts count on that. A new file is in that unit unless it is listed here.
RUN_BESIDE_OTHERS = {f"tests/test_{name}.py" for name in (
    "compare_refs", "curvature", "design_screen", "dmd", "epinet", "estimator_comparison", "estimators",
    "fuzz_inputs", "generalisation_curve", "hand_designed", "inspector", "learned_optimizers", "mfac",
    "nominal_mlp", "optimizers", "rate_trace", "registry", "sparse", "suites", "task_augment",
    "task_families_images", "task_families_least_squares", "task_families_text", "task_zoo", "torch",
    "tuning", "update_model", "wire")}


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's, which a plain `pytest` may lack
def pytest_xdist_make_scheduler(config, log):
    """xdist's per-file scheduling, with every file not in RUN_BESIDE_OTHERS one unit. (Its own
    `--dist loadgroup` marks do not group under pytest 9, which ignores the node ids it rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class OneUnitForServices(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in RUN_BESIDE_OTHERS else "services"

    return OneUnitForServices(config, log)


# --- certificates ---------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, san=None, usage=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, str]:
    """Paths of PEM files: ca, server_cert/key, client_cert/key (from ca), other_ca, and
    other_client_cert/key (from other_ca)."""
    out = tmp_path_factory.mktemp("pki")
    paths: dict[str, str] = {}

    def write(name: str, cert, key=None):
        paths[name if key is None else f"{name}_cert"] = str(out / f"{name}.crt")
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            paths[f"{name}_key"] = str(out / f"{name}.key")
            (out / f"{name}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    for ca_name, leaf_prefix in (("ca", ""), ("other_ca", "other_")):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        write(ca_name, _cert(ca_name, ca_key, ca_name, ca_key, ca=True))
        client_key = ec.generate_private_key(ec.SECP256R1())
        write(f"{leaf_prefix}client", _cert(f"{leaf_prefix}worker", client_key, ca_name, ca_key,
                                            usage=ExtendedKeyUsageOID.CLIENT_AUTH), client_key)
        if ca_name == "ca":
            server_key = ec.generate_private_key(ec.SECP256R1())
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            write("server", _cert("localhost", server_key, ca_name, ca_key, san=san,
                                  usage=ExtendedKeyUsageOID.SERVER_AUTH), server_key)
    return paths
