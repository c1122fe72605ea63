"""Keep recipe mistakes found: random recipes over every step's keys and YAML's edge cases either build or
fail with one short ``RecipeError`` line naming the file, never anything else (hypothesis)."""

import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.recipe import Recipe, RecipeError, catalogue
from compressor.step import SHOWN_CHARACTERS

CATALOGUE = catalogue()
STEP_SPECS = {name: {spec["key"]: spec for spec in entry["params"]} for name, entry in CATALOGUE["steps"].items()}

odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
numbers = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 10**30, -1, 0, 2**31]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    odd_text,
    st.sampled_from(["re:(", "re:.*", "lm_head", "5GB", "0B", "auto", "demo", "float16", "static"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=3), max_leaves=8
)


def value_for(spec: dict):
    """Values aimed at a key: its own kind of value at the edges, its choices, or anything."""
    aimed = [values]
    if spec["choices"]:
        aimed.append(st.sampled_from(spec["choices"]))
    if {"int", "float"} & set(spec["type"]):
        aimed.append(numbers)
    if any(t.startswith("list[") for t in spec["type"]):
        aimed.append(st.lists(st.sampled_from(["re:(", "re:[", "lm_head", "*mlp*", "\x00"]) | odd_text, max_size=3))
    return st.one_of(aimed)


@st.composite
def steps(draw):
    name = draw(st.sampled_from([*STEP_SPECS, "rnt", ""]))
    specs = STEP_SPECS.get(name, {})
    keys = draw(st.lists(st.sampled_from([*specs, "bitz"]) | odd_text, max_size=4, unique=True))
    params = {key: draw(value_for(specs[key]) if key in specs else values) for key in keys}
    return draw(st.sampled_from([name, {name: params}, {name: None}, [name], params]))


recipes = st.fixed_dictionaries(
    {"steps": st.lists(steps(), max_size=3)},
    optional={
        "calibration": st.dictionaries(
            st.sampled_from(["dataset", "samples", "seq_len", "seed", "x"]), values, max_size=3
        ),
        "export": st.dictionaries(st.sampled_from(["format", "dtype", "max_shard_size", "y"]), values, max_size=3),
        odd_text: values,
    },
)


def numbers_in(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers_in(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def check_one_line(path, data) -> None:
    """A recipe that builds holds only finite numbers of a sane size; one that does not is one line."""
    try:
        recipe = Recipe.from_yaml(path)
    except RecipeError as error:
        message = str(error)
        assert message.startswith(str(path)), message
        assert "\n" not in message and "\r" not in message and "Traceback" not in message, message
        assert len(message) < len(str(path)) + 6 * SHOWN_CHARACTERS + 400, message
    else:
        for number in numbers_in(recipe.to_dict()):
            assert math.isfinite(number), (number, data)
            assert isinstance(number, float) or abs(number) <= 2**31 - 1, (number, data)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=recipes)
def test_random_recipes_build_or_fail_in_one_line(data, tmp_path):
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    except (yaml.YAMLError, UnicodeEncodeError):  # something YAML itself cannot write
        return
    check_one_line(path, data)


@settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_random_bytes_as_a_recipe_fail_in_one_line(text, tmp_path):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    check_one_line(path, text)


@st.composite
def one_key_recipes(draw):
    """One step with one key set at its edges: a mistake here cannot hide behind another one."""
    name = draw(st.sampled_from(sorted(STEP_SPECS)))
    key = draw(st.sampled_from(sorted(STEP_SPECS[name])))
    return {"steps": [{name: {key: draw(value_for(STEP_SPECS[name][key]))}}]}


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=one_key_recipes())
def test_one_key_at_its_edges_builds_sanely_or_fails_in_one_line(data, tmp_path):
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    except (yaml.YAMLError, UnicodeEncodeError):
        return
    check_one_line(path, data)
