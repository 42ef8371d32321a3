"""``sparsekern.bench.instructions``: the parts that run without valgrind (dump parsing, the table, the
measured region), so a broken count shows here rather than after minutes under callgrind."""

import ctypes

import pytest

from sparsekern.bench import instructions


def test_total_reads_the_callgrind_dump_and_refuses_one_without_totals(tmp_path):
    dump = tmp_path / "cg.out.1"
    dump.write_text("version: 1\ncmd: python\nevents: Ir\nfl=x\nfn=y\n3 10\nsummary: 123456\ntotals: 123456\n")
    assert instructions._total(str(dump)) == 123456
    (tmp_path / "bad").write_text("events: Ir\n")
    with pytest.raises(ValueError, match="no totals"):
        instructions._total(str(tmp_path / "bad"))


def test_table_divides_each_case_by_its_own_dense_count():
    counts = {"linear dense": 1000, "linear d=0.1": 250, "conv dense": 900, "conv d=0.5": 600}
    text = instructions.table(counts)
    assert "| linear d=0.1 | 250 | 4.00x |" in text
    assert "| conv d=0.5 | 600 | 1.50x |" in text


def test_region_calls_back_once(native_only):
    from sparsekern.kernels import native

    calls = []
    native.lib().sk_region(ctypes.CFUNCTYPE(None)(lambda: calls.append(1)))
    assert calls == [1]


def test_every_case_has_a_provider_that_steps(monkeypatch):
    import sparsekern.kernels as sk

    monkeypatch.setattr(sk, "INTERPRET", False)  # the CPU engine, as the bench runs it
    providers = instructions._providers()
    assert tuple(providers) == instructions.CASES
    providers["conv d=0.1"]()
    providers["linear d=0.5"]()
