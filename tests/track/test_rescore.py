"""Re-scoring a served model on a new build: items it never saw, as serving treats them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from cdsr.track.pyfunc import CDSRRecommender
from cdsr.track.rescore import _InNewIds


class FakeServed:
    """The parts of CDSRRecommender the re-score uses: vocabulary, domains, window, _scores."""

    idx_of_id = {"a": 1, "b": 2, "c": 3}
    dom_of_name = {"X": 0}
    max_len = 5
    own_ids = CDSRRecommender.own_ids  # the served model's own mapping

    def __init__(self):
        self.seen = []

    def _scores(self, histories, targets):
        self.seen.extend(histories)
        return torch.tensor([[float("-inf"), 0.1, 0.9, 0.5]]).expand(len(targets), -1).clone()


def test_unseen_items_are_dropped_from_histories_and_never_recommended():
    rec = FakeServed()
    new_items = pd.DataFrame({"item_idx": [1, 2, 3, 4, 5], "item_id": ["c", "zz", "a", "b", "yy"]})
    m = _InNewIds(rec, new_items, ["X", "NewDomain"])
    batch = {"items": torch.tensor([[0, 1, 2, 3], [1, 3, 4, 5]]), "mask": torch.tensor([[False, True, True, True]] * 2),
             "domains": torch.zeros(2, 4, dtype=torch.long), "timestamps": torch.arange(8).view(2, 4),
             "target_domain": torch.tensor([0, 1])}
    s = m.score(batch)
    ninf = float("-inf")
    # new ids: 1 = c (old 3), 2 = zz (unseen), 3 = a (old 1), 4 = b (old 2), 5 = yy (unseen)
    assert torch.equal(s[0], torch.tensor([ninf, 0.5, ninf, 0.1, 0.9, ninf]))
    assert torch.isinf(s[1]).all()  # a target domain the model does not know: every score -inf
    assert len(rec.seen) == 1 and rec.seen[0][0].tolist() == [3, 1]  # zz dropped, c and a kept in order
    assert m.dropped == 2  # row 0's zz and row 1's yy (row 1's a and b are known)
    cands = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(m.score(batch, cands), s.gather(1, cands))
    assert np.array_equal(m.to_old, [0, 3, 0, 1, 2, 0])
