"""pipeline.text: counts in English and the verbs that agree with them."""

from __future__ import annotations

from pipeline.text import counted, every, per_second, verb_for


def test_counts_take_the_plural_except_for_one():
    assert [counted(n, "shard") for n in (0, 1, 2)] == ["0 shards", "1 shard", "2 shards"]
    assert counted(2, "class", "classes") == "2 classes" and counted(1, "class", "classes") == "1 class"


def test_every_one_of_a_count_reads_as_english():
    assert every(1, "shard") == "the one shard"
    assert every(3, "shard") == "all 3 shards"
    assert every(2, "batch", "batches") == "all 2 batches"


def test_verbs_agree_with_the_count():
    assert [f"{counted(n, 'shard')} {verb_for(n, 'was', 'were')}" for n in (0, 1, 3)] == [
        "0 shards were", "1 shard was", "3 shards were"]


def test_slow_rates_keep_two_significant_digits():
    """One large raster in half a minute is 0.033 images/s, not 0.0."""
    assert [per_second(r) for r in (0.0, 1 / 30, 0.5, 0.94, 0.999, 1.0, 12.345, 250.0)] == [
        "0.0", "0.033", "0.5", "0.94", "1.0", "1.0", "12.3", "250.0"]  # never "1" beside "1.0"
