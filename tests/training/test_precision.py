"""Precision choice: bf16=None means bf16 exactly when /proc/cpuinfo lists a native bf16 feature; explicit choices
win, with a warning for bf16 on a CPU that emulates it."""

import pytest

import lorakit.training.precision as precision

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f avx512bw {extra} sha_ni
bugs\t\t: sysret_ss_attrs
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes {extra} sve
CPU implementer\t: 0x41
"""


def test_cpu_flags_reads_x86_flags_and_arm_features() -> None:
    assert {"avx2", "avx512f", "sha_ni"} <= precision.cpu_flags(X86.format(extra="avx512_bf16"))
    assert "sysret_ss_attrs" not in precision.cpu_flags(X86.format(extra=""))  # "bugs" is not a feature line
    assert {"asimd", "bf16"} <= precision.cpu_flags(ARM.format(extra="bf16"))


@pytest.mark.parametrize(
    ("text", "native"),
    [
        (X86.format(extra="avx512_bf16"), True),
        (X86.format(extra="amx_tile amx_bf16"), True),
        (X86.format(extra="avx512_vnni"), False),  # AVX512 alone emulates bf16: slower than fp32
        (ARM.format(extra="bf16"), True),
        (ARM.format(extra="i8mm"), False),
        ("", False),
    ],
)
def test_native_bf16_from_cpuinfo(text: str, native: bool) -> None:
    assert precision.has_native_bf16(text) is native


def test_resolve_bf16_explicit_choice_wins(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for native in (True, False):
        monkeypatch.setattr(precision, "has_native_bf16", lambda native=native: native)
        caplog.clear()
        assert precision.resolve_bf16(None) is native
        assert precision.resolve_bf16(False) is False
        assert not caplog.records
        assert precision.resolve_bf16(True) is True
        assert ("emulated" in caplog.text and "--no-bf16" in caplog.text) is not native
