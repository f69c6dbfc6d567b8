"""Shuffle pool bookkeeping (monosem.pool) without processes: rows move, vectors are never lost or repeated.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_pool.py
"""
import numpy as np
import pytest

from monosem.pool import Pool


def check_invariants(pool: Pool) -> None:
    live = pool.live[:pool.n]
    assert (pool.row_pos[live] == np.arange(pool.n)).all()             # rows <-> positions agree
    assert (pool.row_pos >= 0).sum() == pool.n
    assert (np.bincount(live // pool.S, minlength=pool.n_blocks) == pool.block_live).all()
    assert not set(pool.free) & set((pool.block_live > 0).nonzero()[0].tolist())


@pytest.mark.parametrize("spare", [0, 2])
def test_rows_move_to_free_blocks_but_every_vector_is_drawn_once_with_its_values(spare):
    P, S, n_slots = 96, 16, 3
    n_blocks = P // S + n_slots + spare
    pool, rng = Pool(P, S, n_blocks), np.random.default_rng(0)
    acts = np.zeros((n_blocks * S, 3), np.int32)                          # a vector = its id, 3 times
    ids = np.full(n_blocks * S, -1, np.int64)
    lent, produced, drawn = [], 0, []
    for _ in range(400):
        while len(lent) < n_slots:
            block = pool.free_block(acts, ids)
            assert block not in lent and (pool.row_pos[block * S:(block + 1) * S] < 0).all()
            check_invariants(pool)
            lent.append(block)
        while pool.n + S <= P:                                            # the buffer's fill rule
            block, count = lent.pop(0), int(rng.integers(1, S + 1))       # short slots too
            rows = np.arange(block * S, block * S + count)
            ids[rows] = np.arange(produced, produced + count)
            acts[rows] = ids[rows, None]
            produced += count
            pool.add_block(block, count)
            check_invariants(pool)
            lent.append(pool.free_block(acts, ids))
        rows = pool.draw(int(rng.integers(1, min(40, pool.n) + 1)), rng).numpy()
        assert (acts[rows] == ids[rows, None]).all()                    # moved rows kept their values
        drawn += ids[rows].tolist()
        check_invariants(pool)
    left = ids[pool.live[:pool.n]].tolist()
    assert sorted(drawn + left) == list(range(produced))                # nothing lost, nothing twice
    assert pool.moved > 0                                                # the move path was taken


def test_restore_puts_saved_vectors_in_the_first_blocks():
    pool = Pool(64, 16, 10)
    pool.restore(40)
    check_invariants(pool)
    assert pool.block_live[:3].tolist() == [16, 16, 8] and pool.free == list(range(3, 10))


@pytest.mark.parametrize("n,k", [(40, 10), (400, 10)])
def test_draws_are_uniform_subsets_in_random_order(n, k):
    rng, draws = np.random.default_rng(2), 20000
    counts, firsts = np.zeros(n), np.zeros(n)
    for _ in range(draws):
        pool = Pool(n, 8, -(-n // 8) + 1)
        pool.restore(n)                                       # row r holds position r
        rows = pool.draw(k, rng).numpy()
        assert len(set(rows.tolist())) == k and pool.n == n - k
        counts[rows] += 1
        firsts[rows[0]] += 1
    mean = draws * k / n                                   # binomial: sd = sqrt(mean (1 - k/n))
    assert np.abs(counts - mean).max() < 5 * (mean * (1 - k / n)) ** 0.5
    assert np.abs(firsts - draws / n).max() < 5 * (draws / n) ** 0.5


def test_a_released_block_is_lent_again_first():
    pool = Pool(64, 16, 8)
    lent = [pool.free_block(None, None) for _ in range(3)]              # free blocks: nothing moves
    pool.release(lent[1])                                                # came back unfilled
    assert pool.free_block(None, None) == lent[1] and pool.n == 0 and pool.moved == 0
