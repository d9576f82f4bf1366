"""benchmarks/sweep_engine.shared_decode_steps: the decode steps a cell's trials would share while
their sampled tokens agree, counted by hand on small cells (the docs' 1.05x for the 405B run's
responses rests on it)."""
from benchmarks.sweep_engine import shared_decode_steps


def test_counts_a_trie_per_cell_with_eos_steps_only_before_the_cap():
    cells = [
        [[1, 2, 3], [1, 2, 4], [5]],  # cap 3: the first two hit it (no EOS step), [5] ends: 3 + 3 + 2 steps
        [[1]],  # another cell: its first step is not shared with the first cell's, though the token is
    ]
    # distinct: (1) (1,2) (1,2,3) (1,2,4) (5) (5,EOS) in the first cell; (1) (1,EOS) in the second
    assert shared_decode_steps(cells, cap=3) == (10, 8)


def test_identical_trials_share_every_step():
    assert shared_decode_steps([[[7, 8], [7, 8], [7, 8]]], cap=5) == (9, 3)
    assert shared_decode_steps([[[7], [8]]], cap=5) == (4, 4)
