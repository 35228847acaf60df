"""The `adapters` metamodel strategy: each concept its own adapter over an unchanged trunk, routed by prompt."""
import json

import pytest

from big.weights import metamodel
from big.weights.metamodel import Adapter, Stack

A = Adapter(1, "c1", "bnp")
B = Adapter(2, "c2", "ssh")


def test_route_picks_the_adapters_whose_identifiers_are_words_of_the_prompt():
    assert metamodel.route("a ssh painting of a bnp shape", [A, B]) == (A, B)  # in the order taught
    assert metamodel.route("a (BNP:1.3) shape", [A, B]) == (A,)  # emphasis and case as the tokenizer sees them
    assert metamodel.route("a bnpx shape, ssh-like", [A, B]) == ()  # whole words only
    assert metamodel.route("a red star", [A, B]) == ()


def test_group_by_route_keeps_every_prompt_once():
    groups = metamodel.group_by_route(["a bnp shape", "a red star", "a ssh painting of a bnp shape", "a bnp shape"],
                                      [A, B])
    assert groups == {(A,): [0, 3], (): [1], (A, B): [2]}


def test_stacks_grow_by_adapters_and_trunks_keep_them():
    s1 = metamodel.after_adapter(metamodel.EMPTY, A)
    s2 = metamodel.after_adapter(s1, B)
    assert s2 == Stack(0, (A, B))
    s3 = metamodel.after_trunk(s2, 3)
    assert s3 == Stack(3, (A, B))
    assert metamodel.stack_of(s3.to_meta(), 3) == s3
    assert metamodel.stack_of(json.loads(json.dumps(s3.to_meta())), 3) == s3  # as stored in big_version.json
    assert metamodel.stack_of({"method": "dreambooth"}, 5) == Stack(5)  # written before stacks: its own trunk
    with pytest.raises(ValueError, match="already has an adapter"):
        metamodel.after_adapter(s2, Adapter(4, "c4", "bnp"))














