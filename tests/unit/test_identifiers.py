import pytest

from big.errors import Conflict
from big.training.identifiers import choose_identifier, identifier_pool, is_single_token
from shapes_world import world


def test_embedded_pool_is_large_single_token_and_free_of_world_words(embedded_tokenizer):
    pool = identifier_pool(embedded_tokenizer, embedded_tokenizer.name_or_path)
    assert len(pool) >= 200
    assert len(set(pool)) == len(pool)
    assert all(is_single_token(embedded_tokenizer, w) for w in pool)
    words = set(world.SHAPES) | set(world.COLOURS) | set(world.STYLES) | set(world.BACKGROUNDS)
    assert not words & set(pool)


def test_derived_pool_for_a_tokenizer_without_a_shipped_pool(embedded_tokenizer):
    pool = identifier_pool(embedded_tokenizer, tokenizer_dir=None)
    assert "sks" in pool and all(is_single_token(embedded_tokenizer, w) for w in pool)


def test_never_hands_out_a_taken_identifier():
    pool = ["sks", "qzq", "brc"]
    assert choose_identifier(pool, ["sks"]) == "qzq"
    assert choose_identifier(pool, ["SKS", "qzq"]) == "brc"
    with pytest.raises(Conflict):
        choose_identifier(pool, pool)


def test_seeded_choice_is_deterministic_and_respects_reserved_words():
    pool = [f"w{i}" for i in range(100)]
    a = choose_identifier(pool, [], seed=7)
    assert a == choose_identifier(pool, [], seed=7)
    assert choose_identifier(["dog", "sks"], [], reserved_words=["dog"]) == "sks"
