"""Property tests (hypothesis) of the runtime's page allocator (``runtime.engine.PagePool``): random sequences of
reservations, steps and releases keep the pool consistent, and every refusal leaves it exactly as it was."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.engine import PagePool, RequestError

ops = st.lists(st.one_of(
    st.tuples(st.just("ensure"), st.lists(st.integers(0, 70), min_size=3, max_size=3)),
    st.tuples(st.just("step"), st.lists(st.integers(-6, 70), min_size=3, max_size=3), st.integers(1, 9)),
    st.tuples(st.just("release")),
), max_size=25)


def _snapshot(pool: PagePool):
    return (pool.table.clone(), copy.deepcopy(pool.rows), list(pool.held), list(pool._free))


def _invariants(pool: PagePool) -> None:
    used = [p for row in pool.rows for p in row]
    assert len(used) == len(set(used)), "a page belongs to two rows"
    assert sorted(used + pool._free) == list(range(pool.num_pages)), "pages lost or duplicated"
    for b, row in enumerate(pool.rows):
        assert pool.table[b, : len(row)].tolist() == row, "the block table lists the row's pages in order"
        assert pool.held[b] <= len(row) * pool.page_size, "a row holds positions without pages"


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(4, 40))
def test_random_reservations_and_steps_keep_the_pool_consistent(sequence, num_pages):
    pool = PagePool(num_pages, page_size=8, max_pages_per_seq=8, max_batch=3)
    for op in sequence:
        before = _snapshot(pool)
        try:
            if op[0] == "ensure":
                pool.ensure(op[1])
            elif op[0] == "step":
                positions, T = op[1], op[2]
                pool.check_step(positions, T)
                pool.ensure([max(pool.held[b], p + T) for b, p in enumerate(positions)])
                pool.advance(positions, T)
            else:
                pool.release_all()
        except RequestError:
            after = _snapshot(pool)  # a refused call changes nothing
            assert all((a == b).all() if hasattr(a, "all") else a == b for a, b in zip(before, after))
        _invariants(pool)
