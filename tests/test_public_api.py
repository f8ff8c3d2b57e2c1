from __future__ import annotations

import paigeant_ai


def test_all_is_sorted_and_importable() -> None:
    assert list(paigeant_ai.__all__) == sorted(paigeant_ai.__all__)
    for name in paigeant_ai.__all__:
        assert getattr(paigeant_ai, name) is not None, name
