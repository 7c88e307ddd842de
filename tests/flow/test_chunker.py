"""The one chunker of the rows to embed (:func:`pipeline.flow.streaming.chunk_of`) and the chunk
sizes the streaming pass expects from it (:func:`pipeline.flow.streaming.chunk_len`)."""

import numpy as np
import pytest

from pipeline.flow.streaming import chunk_len, chunk_of


@pytest.mark.parametrize(("count", "chunk_size"), [(1, 1), (7, 3), (9, 3), (10, 1000), (2501, 1000)])
def test_chunk_len_counts_the_rows_chunk_of_puts_in_each_chunk(count: int, chunk_size: int) -> None:
    cut = chunk_of(np.arange(count), chunk_size)
    n_chunks = -(-count // chunk_size)
    assert cut.max() == n_chunks - 1
    assert np.bincount(cut).tolist() == [chunk_len(ix, count, chunk_size) for ix in range(n_chunks)]
    assert sum(chunk_len(ix, count, chunk_size) for ix in range(n_chunks)) == count


def test_chunk_of_keeps_positions_in_order_and_chunks_contiguous() -> None:
    cut = chunk_of(np.array([0, 1, 2, 3, 4, 5, 6]), 3)
    assert cut.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert cut.dtype == np.int64
