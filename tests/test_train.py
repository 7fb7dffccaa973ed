import random

from realign.train import length_grouped_batches


def test_length_grouped_batches_cover_each_example_once_and_pad_less():
    draw = random.Random(1)
    # short task examples and 10% long poison answers, as in the testbed's attack
    lengths = [(90 if draw.random() < 0.1 else 40) + i % 5 for i in range(601)]
    batches = length_grouped_batches(lengths, 8, random.Random(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(601))
    assert all(1 <= len(b) <= 8 for b in batches)
    # the same seed draws the same epoch, another seed another one
    assert batches == length_grouped_batches(lengths, 8, random.Random(0))
    assert batches != length_grouped_batches(lengths, 8, random.Random(1))
    # padded tokens: a batch costs its longest member times its size
    order = list(range(601))
    random.Random(0).shuffle(order)
    plain = [order[i : i + 8] for i in range(0, 601, 8)]
    cost = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    assert cost(batches) < 0.8 * cost(plain)
