"""Property-based tests: every parser of on-disk bytes (manifest, shard headers, shard file lists, the sharder's
source checkpoint reader) ends a hostile case in the plugin's own exception naming the file, or loads it.

A few hundred cases here (derandomized, so CI is reproducible); benchmarks/fuzz.py runs >= 10,000.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import (
    LOAD_VARIANTS, Scratch, byte_mutated, calibration_target, deep_nesting, file_list_attacks, header_attacks,
    header_bytes, manifest_bytes_target, manifest_doc_target, mutated, raw_header_target, shard_file_target,
    source_target,
)


def cases(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    return Scratch.make(tmp_path_factory.mktemp("fuzz"))


def test_pristine_corpus_loads(scratch: Scratch) -> None:
    """The targets reach the deep code: the undamaged corpus passes every check and loads both ranks."""
    assert manifest_bytes_target(scratch, (scratch.pristine / "manifest.json").read_bytes()) == "ok"
    part = scratch.pristine / scratch.part(0, 0)
    for opts in LOAD_VARIANTS:
        assert shard_file_target(scratch, part.read_bytes(), opts=opts) == "ok"
    assert calibration_target(scratch, (scratch.pristine / "calibration.tqcal").read_bytes()) == "ok"
    for tp in (0, 1):
        data = (scratch.pristine / scratch.part(tp, 0)).read_bytes()
        assert source_target(scratch, data) == "ok"  # a shard file is a valid safetensors checkpoint


@pytest.mark.parametrize("text", [
    pytest.param(b"", id="empty"), pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(deep_nesting(100_000), id="deep-nesting"),
    pytest.param(b'{"format": "vllm-gds-sharded", "format_version": ' + b"9" * 5000 + b"}", id="5000-digit-int"),
    pytest.param(b'{"format": "vllm-gds-sharded", "format_version": 3}', id="future-version"),
    pytest.param(b"[1, 2", id="truncated-json"), pytest.param(b"NaN", id="bare-nan"),
])
def test_manifest_hostile_fixed_cases(scratch: Scratch, text: bytes) -> None:
    assert manifest_bytes_target(scratch, text) == "ManifestError"


@given(data=st.data())
@cases(150)
def test_manifest_structured_mutations(scratch: Scratch, data: st.DataObject) -> None:
    doc = data.draw(mutated(scratch.manifest_doc()))
    assert manifest_doc_target(scratch, doc) in ("ok", "ManifestError", "ShardLoadError")


@given(data=st.data())
@cases(60)
def test_manifest_byte_mutations(scratch: Scratch, data: st.DataObject) -> None:
    text = data.draw(byte_mutated((scratch.pristine / "manifest.json").read_bytes()))
    assert manifest_bytes_target(scratch, text) in ("ok", "ManifestError", "ShardLoadError")


@given(data=st.data())
@cases(60)
def test_manifest_file_list_attacks(scratch: Scratch, data: st.DataObject) -> None:
    doc = data.draw(file_list_attacks(scratch.manifest_doc()))
    assert manifest_doc_target(scratch, doc) in ("ok", "ManifestError", "ShardLoadError")


@given(data=st.data())
@cases(150)
def test_shard_header_attacks(scratch: Scratch, data: st.DataObject) -> None:
    """Lying offsets, huge shapes, overlaps, wrong dtypes, non-UTF-8 names, truncated headers, lying lengths,
    generic JSON and byte mutations of a real shard header, through the loader's checks, verify and both host
    read paths (pread ring; zero-copy mapped windows with digests)."""
    tp = data.draw(st.integers(0, 1))
    blob = data.draw(header_attacks(*header_bytes(scratch.pristine / scratch.part(tp, 0))))
    opts = data.draw(st.sampled_from(LOAD_VARIANTS))
    assert shard_file_target(scratch, blob, tp, opts=opts) in ("ok", "ShardLoadError")


@given(data=st.data())
@cases(80)
def test_source_checkpoint_header_attacks(scratch: Scratch, data: st.DataObject) -> None:
    """The same attacks on the sharder's input: SourceCheckpoint.open + reading every tensor."""
    blob = data.draw(header_attacks(*header_bytes(scratch.pristine / scratch.part(1, 0))))
    assert source_target(scratch, blob) in ("ok", "ShardError")


@given(data=st.data())
@cases(80)
def test_calibration_file_attacks(scratch: Scratch, data: st.DataObject) -> None:
    """The TurboQuant calibration file (safetensors bytes, read at engine start): refused with
    TurboQuantCalibrationError naming the file, never a safetensors Rust error or a bare ValueError."""
    blob = data.draw(header_attacks(*header_bytes(scratch.pristine / "calibration.tqcal")))
    assert calibration_target(scratch, blob) in ("ok", "TurboQuantCalibrationError")


@given(prefix=st.integers(0, 2**64 - 1), body=st.binary(max_size=256), size=st.integers(0, 2**63))
@cases(100)
def test_header_parser_random_bytes(prefix: int, body: bytes, size: int) -> None:
    assert raw_header_target(prefix.to_bytes(8, "little") + body, size) in ("ok", "HeaderError")

