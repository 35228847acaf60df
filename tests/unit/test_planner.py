from hypothesis import given, settings, strategies as st

from big.training.planner import EarlierConcept, PriorSlot, counts_by_category, plan_prior_batch


def C(i, cat):
    return EarlierConcept(f"c{i}", f"id{i}", cat)


def by_prompt(plan):
    return {s.prompt: s.count for s in plan}


def test_private_model_is_plain_dreambooth():
    assert plan_prior_batch(100, "dog", [C(1, "dog")], metamodel=False) == [PriorSlot("class", "dog", 100)]


def test_first_concept_of_a_metamodel_uses_only_class_images():
    assert by_prompt(plan_prior_batch(50, "dog")) == {"a dog": 50}


def test_seed_example_two_bottles_two_dogs_one_painting_learning_another_dog():
    learned = [C(1, "bottle"), C(2, "bottle"), C(3, "dog"), C(4, "dog"), C(5, "painting")]
    plan = by_prompt(plan_prior_batch(96, "dog", learned))
    # Half to "dog": 24 class images + 12 to each earlier dog.
    assert plan["a dog"] == 24 and plan["a id3 dog"] == 12 and plan["a id4 dog"] == 12
    # The other half shared by bottle and painting: 24 each, half class, half instances.
    assert plan["a bottle"] == 12 and plan["a id1 bottle"] == 6 and plan["a id2 bottle"] == 6
    assert plan["a painting"] == 12 and plan["a id5 painting"] == 12
    assert sum(plan.values()) == 96


def test_only_other_categories_learned_gives_current_category_half():
    plan = by_prompt(plan_prior_batch(40, "painting", [C(1, "bottle")]))
    assert plan == {"a painting": 20, "a bottle": 10, "a id1 bottle": 10}


def test_largest_remainder_sums_exactly_for_awkward_budgets():
    learned = [C(i, cat) for i, cat in enumerate(["a", "a", "a", "b", "c", "c", "d"])]
    for budget in range(0, 60):
        plan = plan_prior_batch(budget, "a", learned)
        assert sum(s.count for s in plan) == budget


def test_every_earlier_concept_keeps_a_slot_when_budget_allows():
    learned = [C(i, "dog") for i in range(10)] + [C(10 + i, f"cat{i}") for i in range(6)]
    plan = plan_prior_batch(20, "dog", learned)
    replayed = {s.concept_id for s in plan if s.kind == "instance"}
    assert replayed == {c.concept_id for c in learned}
    assert sum(s.count for s in plan) == 20


def test_tiny_budget_stays_exact_and_proportional():
    learned = [C(i, "dog") for i in range(10)]
    plan = plan_prior_batch(3, "dog", learned)
    assert sum(s.count for s in plan) == 3


def test_counts_by_category():
    plan = plan_prior_batch(96, "dog", [C(1, "bottle"), C(3, "dog")])
    assert counts_by_category(plan) == {"dog": 48, "bottle": 48}


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(0, 500), cats=st.lists(st.sampled_from("abcdef"), max_size=12), current=st.sampled_from("abcdefg"))
def test_plan_properties(budget, cats, current):
    learned = [C(i, c) for i, c in enumerate(cats)]
    plan = plan_prior_batch(budget, current, learned)
    assert sum(s.count for s in plan) == budget
    assert all(s.count > 0 for s in plan)
    if budget >= len(learned) + 1 + len(set(cats)):
        assert {s.concept_id for s in plan if s.kind == "instance"} == {c.concept_id for c in learned}
