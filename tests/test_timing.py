"""mxep.testing.timing's interval arithmetic behind the GPU busy fractions (the profiling itself
needs a GPU: bench_moe on the device machine)."""
from mxep.testing.timing import union_length


def test_union_length_counts_overlaps_once_and_gaps_not_at_all():
    # two streams overlapping (0-4, 2-5), one nested (3-4), a gap 5-7, then 7-10 given first
    spans = [(7.0, 10.0), (0.0, 4.0), (2.0, 5.0), (3.0, 4.0)]
    busy, span = union_length(spans)
    assert busy == 8.0 and span == 10.0


def test_union_length_of_nothing():
    assert union_length([]) == (0.0, 0.0)
