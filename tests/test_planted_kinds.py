"""Issue 14's known-answer bar for every planted kind, on the benchmark's own models: trained on
Debian's Fashion-MNIST by `flipback bench faithfulness`'s recipe, the cued model reacts to the
cue as designed (>= 90% of cued test images of other classes go to the cue's class) and keeps
its clean accuracy within 2 points of the uncued control. Seven trainings of ~1 min on 2 cores:
six cued models and the one control every kind shares."""

import pytest
import torch

from flipback.data import fashion_mnist_dir, load_dataset
from flipback.data.planted import KINDS, Cue, default_size
from flipback.runs.faithfulness import BARS
from flipback.runs.planted import planted_models

pytestmark = pytest.mark.skipif(fashion_mnist_dir() is None,
                                reason="Debian's fashion-mnist package is not installed (apt-get install "
                                "dataset-fashion-mnist; `make test` does it)")


@pytest.fixture(scope="module")
def fashion_mnist():
    root = fashion_mnist_dir()
    return load_dataset(root, split="train", progress=False), load_dataset(root, split="test", progress=False)


@pytest.fixture
def two_threads():
    # Full-size trainings: worth both cores, unlike the suite's tiny models.
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kind", KINDS)
def test_the_planted_model_learns_each_kind_as_designed(kind, fashion_mnist, two_threads):
    train, test = fashion_mnist
    cue = Cue(target=0, size=default_size(kind), kind=kind)
    m = planted_models(train, test, cue, show_progress=False, log=lambda *_: None)
    assert m.cue_success >= BARS["cue_success"], (kind, m.cue_success)
    assert m.uncued_accuracy - m.clean_accuracy <= BARS["accuracy_drop"], (kind, m.clean_accuracy, m.uncued_accuracy)
    if kind == "or":  # either patch alone triggers
        assert min(m.part_success.values()) >= BARS["cue_success"], m.part_success
    if kind == "and":  # one patch alone does not: the model needs both
        assert max(m.part_success.values()) <= 0.2, m.part_success
