"""The synthesised MERA samples files in tests/fixtures/mera (made by make_fixtures.py), shared by the tests."""

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "mera"
MED = FIXTURES / "samples_med_bench_2026-05-01T10-15-30.123456.jsonl"
AGRO = FIXTURES / "samples_agro_bench_2026-05-01T11-20-45.654321.jsonl"
AQUA = FIXTURES / "samples_aqua_bench_2026-05-01T12-00-00.000001.jsonl"
ALL = {"med_bench": MED, "agro_bench": AGRO, "aqua_bench": AQUA}
# MERA's log_to_submission.py names, written out here as the tests' own expectation
DST_NAMES = {
    "agro_bench": "ruTXTAgroBench",
    "aqua_bench": "ruTXTAquaBench",
    "med_bench": "ruTXTMedQFundamental",
}
