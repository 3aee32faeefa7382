"""Tests of pipeline.model.classes, against the real benchmark files bundled in pipeline/model/descriptions."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (the test extra's tomli)
    import tomli as tomllib

import fsspec
import pytest

from pipeline.config import BUNDLED_SETS, ConfigError, StorageConfig, TextConfig
from pipeline.model.classes import (BUNDLED_FOLDER, ClassSet, DEFAULT_TEMPLATES, TextSources,
                                    detect_description_format, load_class_set, load_descriptions, load_templates,
                                    make_descriptor_sentence, parse_class_list)
from tests.support import upload

DESCRIPTIONS = BUNDLED_FOLDER
CLASS_COUNTS = {"cub": 200, "dtd": 47, "eurosat": 10, "food101": 101, "oxford_pet": 37}
TEMPLATES = {
    "cub": ["a photo of a {}, a type of bird."],
    "dtd": [f"a photo of {article} {{}} {kind}." for article in ("a", "the")
            for kind in ("texture", "pattern", "thing", "object")],
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "food101": ["a photo of {}, a type of food."],
    "oxford_pet": ["a photo of a {}, a type of pet."],
    "place365": ["a photo of a {}, a type of place.", "a photo of the {}, a type of place."],
}


def bench(name: str, file: str) -> str:
    return str(DESCRIPTIONS / name / file)


def read(name: str, file: str):
    return json.loads((DESCRIPTIONS / name / file).read_text(encoding="utf-8"))


def write(tmp_path: Path, file: str, content) -> str:
    path = tmp_path / file
    text = content if isinstance(content, str) else json.dumps(content)
    path.write_text(text, encoding="utf-8")
    return str(path)


def classes_spec(tmp_path: Path, name: str) -> str:
    """The benchmark's classes.json, or (eurosat, place365) its cupl.json keys in a text file."""
    if name in ("eurosat", "place365"):
        return write(tmp_path, "classes.txt", "\n".join(read(name, "cupl.json")) + "\n")
    return bench(name, "classes.json")


# ---------------------------------------------------------------- real benchmark files


@pytest.mark.parametrize("name", sorted(CLASS_COUNTS))
def test_benchmark_cupl_loads_with_exact_lists(tmp_path, name):
    cfg = TextConfig(classes=classes_spec(tmp_path, name), descriptions=bench(name, "cupl.json"),
                     templates=bench(name, "templates.json"))
    classes = load_class_set(cfg)
    cupl = {key.lower(): value for key, value in read(name, "cupl.json").items()}
    assert len(classes.names) == CLASS_COUNTS[name]
    assert classes.templates == tuple(TEMPLATES[name])
    for class_name, descriptions in zip(classes.names, classes.descriptions):
        assert descriptions == tuple(cupl[class_name.replace("_", " ").lower()])
        assert descriptions


def test_food101_underscore_names_match_spaced_keys():
    cfg = TextConfig(classes=bench("food101", "classes.json"),
                     descriptions=bench("food101", "cupl.json"))
    classes = load_class_set(cfg)
    index = classes.names.index("apple_pie")
    assert index == 0
    assert classes.descriptions[index] == tuple(read("food101", "cupl.json")["apple pie"])
    assert classes.descriptions[index][0] == (
        "Apple pie is traditionally made with a round, double-crust pastry.")
    assert classes.templates == DEFAULT_TEMPLATES
    assert classes.prompts(index) == ("a photo of a apple pie.",)  # label keeps apple_pie


def test_eurosat_class_order_follows_class_list(tmp_path):
    classes = load_class_set(TextConfig(classes=classes_spec(tmp_path, "eurosat"),
                                        descriptions=bench("eurosat", "descriptors.json")))
    assert classes.names[:3] == ("forest", "permanent crop land",
                                 "residential buildings or homes or apartments")
    assert classes.descriptions[0] == ("forest, which is a large area of trees",
                                       "forest, which has green leaves")


def test_cub_descriptor_sentences():
    classes = load_class_set(TextConfig(classes=bench("cub", "classes.json"),
                                        descriptions=bench("cub", "descriptors.json"),
                                        templates=bench("cub", "templates.json")))
    assert classes.names[0] == "Black-footed Albatross"
    assert classes.descriptions[0] == (
        "Black-footed Albatross, which is a seabird",
        "Black-footed Albatross, which has black and white",
        "Black-footed Albatross, which is a long, hooked bill",
        "Black-footed Albatross, which has long, narrow wings",
        "Black-footed Albatross, which has black feet",
        "Black-footed Albatross, which is a white head and neck",
    )
    assert classes.prompts(0) == ("a photo of a Black-footed Albatross, a type of bird.",)


def test_place365_descriptor_sentences_follow_menon_vondrick_rule(tmp_path):
    classes = load_class_set(TextConfig(classes=classes_spec(tmp_path, "place365"),
                                        descriptions=bench("place365", "descriptors.json")))
    assert len(classes.names) == 344
    by_name = dict(zip(classes.names, classes.descriptions))
    assert by_name["airfield"] == (
        "airfield, which is an airport", "airfield, which is a runway",
        "airfield, which is an airstrip", "airfield, which is aircraft",
        "airfield, which has hangar", "airfield, which has control tower")
    assert by_name["airplane cabin"][1:] == (
        "airplane cabin, which typically has rows of seats and overhead bins",
        "airplane cabin, which may have a galley or lavatory",
        "airplane cabin, which often has a window")
    assert by_name["aqueduct"][3] == (
        "aqueduct, which is used to transport water from one place to another")


def test_food101_descriptors_use_spaced_name():
    descriptions, fmt = load_descriptions(bench("food101", "descriptors.json"),
                                          read("food101", "classes.json"), "auto")
    assert fmt == "descriptors"
    assert descriptions[0][:3] == ("apple pie, which is a pie dish", "apple pie, which is a crust",
                                   "apple pie, which has filling made of apples")
    assert len(descriptions[0]) == len(read("food101", "descriptors.json")["apple pie"])


def test_place365_duplicate_class_names_are_an_error():
    with pytest.raises(ConfigError) as err:
        parse_class_list(bench("place365", "classes.json"))
    message = str(err.value)
    assert bench("place365", "classes.json") in message
    assert "19 class names occur more than once" in message
    assert "'arena' at positions 15, 16, 17" in message
    assert "'stadium' at positions 312, 313, 314" in message
    assert "must be unique" in message and "arena hockey" in message
    with pytest.raises(ConfigError, match="occur more than once"):
        load_class_set(TextConfig(classes=bench("place365", "classes.json"),
                                  descriptions=bench("place365", "cupl.json")))


def test_place365_loads_from_unique_cupl_keys(tmp_path):
    cfg = TextConfig(classes=classes_spec(tmp_path, "place365"),
                     descriptions=bench("place365", "cupl.json"),
                     templates=bench("place365", "templates.json"))
    classes = load_class_set(cfg)
    cupl = read("place365", "cupl.json")
    assert classes.names == tuple(cupl)
    assert classes.descriptions == tuple(tuple(v) for v in cupl.values())
    assert classes.prompts(0) == ("a photo of a airfield, a type of place.",
                                  "a photo of the airfield, a type of place.")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_auto_format_detects_real_files_by_content(tmp_path, name):
    for source, expected in (("cupl.json", "cupl"), ("descriptors.json", "descriptors")):
        data = read(name, source)
        assert detect_description_format(write(tmp_path, "d.json", data), data) == expected


def test_benchmark_templates_load():
    for name, expected in TEMPLATES.items():
        assert load_templates(bench(name, "templates.json")) == tuple(expected)


# ---------------------------------------------------------------- bundled sets by name


def test_the_package_bundles_the_six_sets_with_their_licence():
    assert sorted(path.name for path in DESCRIPTIONS.iterdir() if path.is_dir()) == sorted(BUNDLED_SETS)
    assert "MIT License" in (DESCRIPTIONS / "LICENSE-WCA.md").read_text(encoding="utf-8")
    for name in BUNDLED_SETS:
        files = {"cupl.json", "descriptors.json", "templates.json"} | ({"classes.json"} if name != "eurosat" else set())
        assert {path.name for path in (DESCRIPTIONS / name).iterdir()} == files, name


def test_pyproject_package_data_carries_every_bundled_file():
    """A wheel or sdist holds the package data pyproject.toml names: every bundled file must match it."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["pipeline"]
    package = DESCRIPTIONS.parents[1]  # the pipeline package folder
    carried = {path for pattern in patterns for path in package.glob(pattern)}
    bundled = {path for path in DESCRIPTIONS.rglob("*") if path.is_file()}
    assert len(bundled) == 25 and bundled <= carried  # 23 JSON files, LICENSE-WCA.md and README.md


@pytest.mark.parametrize("name", BUNDLED_SETS)
def test_a_set_name_selects_the_bundled_classes_cupl_and_templates(tmp_path, name):
    by_name = load_class_set(TextConfig(classes=name, descriptions=name, templates=name))
    by_file = load_class_set(TextConfig(classes=classes_spec(tmp_path, name), descriptions=bench(name, "cupl.json"),
                                        templates=bench(name, "templates.json")))
    assert by_name == by_file and by_name.digests() == by_file.digests()
    assert by_name.templates == tuple(TEMPLATES[name])
    classes_file = "cupl.json keys" if name in ("eurosat", "place365") else "classes.json"
    assert by_name.sources == TextSources(classes=f"bundled:{name}/{classes_file}",
                                          descriptions=f"bundled:{name}/cupl.json", descriptions_format="cupl",
                                          templates=f"bundled:{name}/templates.json")
    assert by_name.to_json()["sources"]["classes"] == f"bundled:{name}/{classes_file}"


def test_bundled_eurosat_and_place365_classes_are_their_cupl_keys_in_order():
    eurosat = load_class_set(TextConfig(classes="eurosat"))
    assert eurosat.names == tuple(read("eurosat", "cupl.json"))
    assert eurosat.names[:3] == ("forest", "permanent crop land", "residential buildings or homes or apartments")
    place365 = load_class_set(TextConfig(classes="place365"))
    first_seen = tuple(dict.fromkeys(read("place365", "classes.json")))  # the 365 names, once each
    assert len(place365.names) == 344 and place365.names == first_seen == tuple(read("place365", "cupl.json"))
    assert place365.templates == DEFAULT_TEMPLATES and place365.sources.templates == ""


def test_descriptors_format_selects_the_bundled_menon_vondrick_descriptors():
    classes = load_class_set(TextConfig(classes="cub", descriptions="cub", descriptions_format="descriptors"))
    assert classes.descriptions[0][:2] == ("Black-footed Albatross, which is a seabird",
                                           "Black-footed Albatross, which has black and white")
    assert classes.sources.descriptions == "bundled:cub/descriptors.json"
    assert classes.sources.descriptions_format == "descriptors"
    cupl = load_class_set(TextConfig(classes="cub", descriptions="cub", descriptions_format="cupl"))
    assert cupl.descriptions[0] == tuple(read("cub", "cupl.json")["Black-footed Albatross"])
    # a set's descriptions with a class list of one's own: only its classes are needed
    pets = load_class_set(TextConfig(classes="Abyssinian,Bengal", descriptions="oxford_pet",
                                     descriptions_format="descriptors", templates="oxford_pet"))
    assert read("oxford_pet", "descriptors.json")["Bengal"][0] == "a large, muscular body"
    assert pets.descriptions[1][0] == "Bengal, which is a large, muscular body"
    assert pets.sources == TextSources(classes="inline", descriptions="bundled:oxford_pet/descriptors.json",
                                       descriptions_format="descriptors", templates="bundled:oxford_pet/templates.json")


def test_a_file_named_like_a_set_is_refused_and_a_folder_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dtd").write_text("banded\nblotchy\n", encoding="utf-8")
    for option in ("classes", "descriptions", "templates"):
        values = {"classes": "cat", option: "dtd"}
        with pytest.raises(ConfigError) as err:
            load_class_set(TextConfig(**values))
        assert str(err.value) == (f"{option}: 'dtd' names both the bundled dtd set and the file ./dtd in this "
                                  f"folder; write ./dtd for the file, or {DESCRIPTIONS / 'dtd'} for the bundled set")
    local = load_class_set(TextConfig(classes="./dtd"))
    assert local.names == ("banded", "blotchy") and local.sources.classes == "./dtd"
    (tmp_path / "cub").mkdir()  # a folder of images named like a set (eval's data, say) is no class list
    assert load_class_set(TextConfig(classes="cub")).names[0] == "Black-footed Albatross"


def test_other_specs_are_recorded_as_given(tmp_path):
    classes_file = write(tmp_path, "c.txt", "cat\ndog\n")
    descriptions = write(tmp_path, "d.json", {"cat": ["whiskers"], "dog": ["a wagging tail"]})
    classes = load_class_set(TextConfig(classes=classes_file, descriptions=descriptions))
    assert classes.sources == TextSources(classes=classes_file, descriptions=descriptions,
                                          descriptions_format="descriptors", templates="")
    assert load_class_set(TextConfig(classes="cat,dog")).sources == TextSources(classes="inline")
    assert load_class_set(TextConfig(classes="Cub")).names == ("Cub",)  # names are exact: an inline class


def test_label_flags_and_job_files_select_a_bundled_set(tmp_path):
    from pipeline.cli import build_parser
    from pipeline.options import build_job, job_from_args, read_job_file

    args = build_parser().parse_args(["label", "--input", "in/", "--output", "out/", "--classes", "food101",
                                      "--descriptions", "food101", "--descriptions-format", "descriptors",
                                      "--templates", "food101"])
    job = job_from_args(args)
    assert job.text == TextConfig(classes="food101", descriptions="food101", descriptions_format="descriptors",
                                  templates="food101")
    classes = load_class_set(job.text)
    assert classes.names[0] == "apple_pie" and classes.prompts(0) == ("a photo of apple pie, a type of food.",)
    assert classes.descriptions[0][0] == "apple pie, which is a pie dish"
    spec = tmp_path / "job.yaml"
    spec.write_text("input: in/\noutput: out/\nclasses: food101\ndescriptions: food101\n"
                    "descriptions_format: descriptors\ntemplates: food101\n", encoding="utf-8")
    assert build_job(read_job_file(str(spec))).text == job.text
    assert "bundled set" in build_parser()._subparsers._group_actions[0].choices["label"].format_help()


# ---------------------------------------------------------------- class lists


def test_class_list_text_json_inline(tmp_path):
    txt = write(tmp_path, "c.txt", "\n  cat \n\n dog\t\n")
    assert parse_class_list(txt) == ("cat", "dog")
    assert parse_class_list(write(tmp_path, "c.json", [" cat", "dog "])) == ("cat", "dog")
    assert parse_class_list("cat, dog ,") == ("cat", "dog")
    assert parse_class_list("arena/hockey") == ("arena/hockey",)


def test_class_list_through_fsspec_uri(tmp_path):
    txt = write(tmp_path, "c.txt", "cat\ndog\n")
    assert parse_class_list(f"file://{txt}") == (
        "cat", "dog")
    with fsspec.open("memory://prompts-test/classes.json", "w") as handle:
        handle.write('["bird", "fish"]')
    assert parse_class_list("memory://prompts-test/classes.json") == ("bird", "fish")


def test_class_list_errors(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match=f"{missing}: file not found"):
        parse_class_list(missing)
    with pytest.raises(ConfigError, match="memory://prompts-test/none.txt: file not found"):
        parse_class_list("memory://prompts-test/none.txt")
    with pytest.raises(ConfigError, match="the class list is empty"):
        parse_class_list(write(tmp_path, "empty.txt", "\n  \n"))
    with pytest.raises(ConfigError, match=r"classes \(inline list\): the class list is empty"):
        parse_class_list(" , ")
    with pytest.raises(ConfigError, match="expected a JSON list of class names, got a JSON object"):
        parse_class_list(write(tmp_path, "d.json", {"cat": 1}))
    with pytest.raises(ConfigError, match="entry 1 is a JSON number"):
        parse_class_list(write(tmp_path, "n.json", ["cat", 3]))
    bad = write(tmp_path, "bad.json", '[\n  "cat",\n  "dog"\n')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 4, column 1"):
        parse_class_list(bad)
    with pytest.raises(ConfigError, match=r"'Apple pie / apple_pie' at positions 0, 2"):
        parse_class_list("apple_pie,pear,Apple pie")


# ---------------------------------------------------------------- templates


def test_templates_errors(tmp_path):
    cases = [
        (["a photo of a {}.", "a photo"], "template 'a photo' has no '{}'"),
        (["a {0} photo"], "has the field '{0}'"),
        (["a {name} photo"], "has the field '{name}'"),
        (["a {:>9} photo"], "has the field '{:>9}'"),
        (["a { photo"], "is not valid format syntax"),
        ([], "the template list is empty"),
        ({"a": "{}"}, "expected a JSON list of templates, got a JSON object"),
        (["{}", None], "entry 1 is a JSON null"),
    ]
    for content, expected in cases:
        path = write(tmp_path, "t.json", content)
        with pytest.raises(ConfigError) as err:
            load_templates(path)
        assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_templates_with_repeated_and_escaped_fields(tmp_path):
    path = write(tmp_path, "t.json", ["{} or {}", "{{{}}}"])
    classes = ClassSet(names=("cat",), templates=load_templates(path), descriptions=((),))
    assert classes.prompts(0) == ("cat or cat", "{cat}")


def test_missing_templates_file(tmp_path):
    missing = str(tmp_path / "templates.json")
    with pytest.raises(ConfigError, match="templates.json: file not found"):
        load_class_set(TextConfig(classes="cat", templates=missing))


# ---------------------------------------------------------------- descriptions


def test_descriptor_sentence_rule():
    assert make_descriptor_sentence("x", "an eye") == "x, which is an eye"
    assert make_descriptor_sentence("x", "antlers") == "x, which is antlers"
    assert make_descriptor_sentence("x", "has wings") == "x, which has wings"
    assert make_descriptor_sentence("x", "can fly") == "x, which can fly"
    assert make_descriptor_sentence("x", "used for fun") == "x, which is used for fun"
    assert make_descriptor_sentence("golden_retriever", "fur") == "golden retriever, which has fur"


def test_descriptions_matching_and_empty_lists(tmp_path, caplog):
    path = write(tmp_path, "cupl.json", {" Apple Pie ": ["An apple pie."], "tea": [],
                                         "unused": ["x."], "other": ["y."]})
    with caplog.at_level(logging.WARNING, logger="pipeline.model.classes"):
        descriptions = load_descriptions(path, ["apple_pie", "TEA"], "auto")
    assert descriptions == ((("An apple pie.",), ()), "cupl")
    assert "2 keys match no class and are ignored" in caplog.text
    classes = load_class_set(TextConfig(classes="apple_pie,TEA", descriptions=path))
    assert classes.descriptions[1] == () and classes.prompts(1) == ("a photo of a TEA.",)


def test_descriptions_errors(tmp_path):
    names = ["cat", "dog", "cow"]
    path = write(tmp_path, "d.json", {"cat": ["a cat."]})
    with pytest.raises(ConfigError) as err:
        load_descriptions(path, names, "cupl")
    assert str(err.value).startswith(f"{path}: 2 of 3 classes have no descriptions, e.g. "
                                     "'dog', 'cow'")
    cases = [
        (["a."], "cupl", "expected a JSON object"),
        ({"cat": "a cat."}, "cupl",
         "class 'cat': expected a JSON list of descriptions, got a JSON string"),
        ({"cat": ["a cat.", 5]}, "cupl", "class 'cat': entry 1 is a JSON number"),
        ({"cat": ["a."], "Cat": ["b."]}, "cupl", "keys 'cat' and 'Cat' name the same class"),
        ({"cat": ["a small domesticated carnivorous mammal with soft fur"]}, "auto",
         "(entries average 8.0 words and 0% end in '.'); set descriptions_format"),
        ({"cat": [], "dog": []}, "auto", "every description list is empty"),
    ]
    for content, fmt, expected in cases:
        path = write(tmp_path, "d.json", content)
        with pytest.raises(ConfigError) as err:
            load_descriptions(path, ["cat"], fmt)
        assert str(err.value).startswith(path) and expected in str(err.value)
    bad = write(tmp_path, "bad.json", '{"cat": ["a",]}')
    with pytest.raises(ConfigError, match="bad.json: invalid JSON at line 1, column 14: Expecting value"):
        load_descriptions(bad, ["cat"], "cupl")


def test_auto_format_content_sniffing_and_file_name_hint(tmp_path):
    phrases = {"cat": ["whiskers", "a long tail"]}
    sentences = {"cat": ["A cat is a small domesticated carnivorous mammal."]}
    assert detect_description_format(write(tmp_path, "x.json", phrases), phrases) == "descriptors"
    assert detect_description_format(write(tmp_path, "x.json", sentences), sentences) == "cupl"
    ambiguous = {"cat": ["whiskers.", "tail."]}
    for hint, fmt in (("descriptors_cat.json", "descriptors"), ("cupl_cat.json", "cupl")):
        assert detect_description_format(write(tmp_path, hint, ambiguous), ambiguous) == fmt
    with pytest.raises(ConfigError, match="set descriptions_format to 'cupl' or 'descriptors'"):
        detect_description_format(write(tmp_path, "x.json", ambiguous), ambiguous)
    path = write(tmp_path, "cupl.json", phrases)
    assert load_descriptions(path, ["cat"], "auto") == ((("whiskers", "a long tail"),), "cupl")  # by its name
    assert load_descriptions(path, ["cat"], "descriptors") == (
        (("cat, which has whiskers", "cat, which is a long tail"),), "descriptors")


def test_descriptions_through_memory_filesystem():
    with fsspec.open("memory://prompts-test/descriptors.json", "w") as handle:
        json.dump({"cat": ["whiskers"]}, handle)
    assert load_descriptions("memory://prompts-test/descriptors.json", ["cat"], "auto") == (
        (("cat, which has whiskers",),), "descriptors")


# ---------------------------------------------------------------- ClassSet


def test_digests_stable_and_sensitive(tmp_path):
    cfg = TextConfig(classes=bench("dtd", "classes.json"), descriptions=bench("dtd", "cupl.json"),
                     templates=bench("dtd", "templates.json"))
    first, second = load_class_set(cfg), load_class_set(cfg)
    assert first == second and first.digests() == second.digests()
    assert all(len(value) == 64 for value in first.digests().values())
    cupl = read("dtd", "cupl.json")
    cupl["banded"][0] += " "
    changed = load_class_set(dataclasses.replace(cfg, descriptions=write(tmp_path, "c.json", cupl)))
    assert changed.digests()["descriptions"] != first.digests()["descriptions"]
    assert changed.digests()["classes"] == first.digests()["classes"]
    assert changed.digests()["templates"] == first.digests()["templates"]
    small = ClassSet(names=("cat",), templates=("{}",), descriptions=(("é",),))
    assert small.digests() == {  # sha256 of '["cat"]', '[["é"]]' (UTF-8) and '["{}"]'
        "classes": "066f70cb15aeb49ac2c61fba5393c8033e33ca23f571387e9a6df8914a7ff111",
        "descriptions": "136ba92c6a9f658695262aabf22f63160f2e04a05a4b11702ef925e16648e008",
        "templates": "06d303a9b27b9a13deb84c837b84a50d7d4423393aae3f9b03a73543785ee0b3",
    }


def test_to_json_round_trips():
    classes = ClassSet(names=("cat", "dog"), templates=DEFAULT_TEMPLATES,
                       descriptions=(("a cat.",), ()))
    record = json.loads(json.dumps(classes.to_json()))
    assert record == {"names": ["cat", "dog"], "templates": ["a photo of a {}."],
                      "descriptions": [["a cat."], []], "digests": classes.digests(), "sources": None}
    loaded = load_class_set(TextConfig(classes="cat,dog", templates="oxford_pet"))
    assert json.loads(json.dumps(loaded.to_json()))["sources"] == {
        "classes": "inline", "descriptions": "", "descriptions_format": "", "templates": "bundled:oxford_pet/templates.json"}


def test_class_set_validates_itself():
    with pytest.raises(ConfigError, match="2 classes"):
        ClassSet(names=("cat", "dog"), templates=DEFAULT_TEMPLATES, descriptions=((),))
    with pytest.raises(ConfigError, match="has no '{}'"):
        ClassSet(names=("cat",), templates=("a photo",), descriptions=((),))
    with pytest.raises(ConfigError, match="no classes"):
        ClassSet(names=(), templates=DEFAULT_TEMPLATES, descriptions=())


def test_each_text_file_is_read_with_the_storage_options_of_its_own_uri(moto_endpoint, bucket):
    """Inline classes with descriptions and templates on S3: the endpoint must reach them too."""
    upload(moto_endpoint, bucket, {"cupl.json": json.dumps({"cat": ["a small furry pet"], "dog": ["a loyal pet"]}).encode(),
                                   "templates.json": json.dumps(["a photo of the {}."]).encode()})
    cfg = TextConfig(classes="cat,dog", descriptions=f"s3://{bucket}/cupl.json", templates=f"s3://{bucket}/templates.json")
    classes = load_class_set(cfg, StorageConfig(endpoint_url=moto_endpoint))
    assert classes.descriptions == (("a small furry pet",), ("a loyal pet",))
    assert classes.templates == ("a photo of the {}.",)
