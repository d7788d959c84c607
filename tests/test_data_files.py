"""insitu.data.files: every format read from tiny files written here, with hand-computed values, and the errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from insitu.data.files import DataSpec, load_data, parse_image_size, parse_normalize
from insitu.data.files.agreement import (
    CLASSES_KEY,
    SHAPE_KEY,
    ClassCheckedClient,
    agreement_config,
    check_classes,
    check_shape,
    encode_classes,
)

NONE = DataSpec(normalize="none", test_fraction=0.0)


def gray(path, value, size=(4, 4)):
    """A grayscale PNG of one value (size is height x width)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


def write_csv(path, text):
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- image folders


def test_image_folder_classes_are_the_sorted_subfolders_and_pixels_scale_to_0_1(tmp_path):
    gray(tmp_path / "dog" / "a.png", 255)
    gray(tmp_path / "cat" / "a.png", 0)
    gray(tmp_path / "cat" / "b.png", 51)
    data = load_data(tmp_path, NONE, role="train")
    assert data.classes == ("cat", "dog")
    assert data.train.input_shape == (1, 4, 4)
    assert data.train.y.tolist() == [0, 0, 1]  # cat/a, cat/b, dog/a (sorted paths)
    assert data.train.x[:, 0, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert len(data.test) == 0 and data.format == "imagefolder"


def test_train_and_test_subfolders_are_the_split(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                gray(tmp_path / split / cls / f"{i}.png", 10)
    data = load_data(tmp_path, NONE)
    assert (len(data.train), len(data.test)) == (6, 2)
    assert data.test.y.tolist() == [0, 1]


def test_a_test_folder_alone_is_all_test_and_a_validation_folder_is_ignored(tmp_path, caplog):
    gray(tmp_path / "test" / "a" / "0.png", 1)
    gray(tmp_path / "test" / "b" / "0.png", 1)
    server = load_data(tmp_path, NONE, role="test")
    assert (len(server.train), len(server.test), server.classes) == (0, 2, ("a", "b"))
    gray(tmp_path / "train" / "a" / "0.png", 1)
    gray(tmp_path / "val" / "a" / "0.png", 1)
    with caplog.at_level(logging.WARNING, logger="insitu.data"):
        data = load_data(tmp_path, NONE)
    assert (len(data.train), len(data.test)) == (1, 2) and "val ignored" in caplog.text


def test_resize_and_rgb_conversion(tmp_path):
    gray(tmp_path / "a" / "0.png", 100, size=(5, 7))
    gray(tmp_path / "b" / "0.png", 200, size=(9, 3))
    data = load_data(tmp_path, DataSpec(image_size=parse_image_size("8x6"), image_mode="rgb", normalize="none",
                                        test_fraction=0), role="train")
    assert data.train.input_shape == (3, 8, 6)
    assert torch.allclose(data.train.x[0], torch.full((3, 8, 6), 100 / 255))


def test_16_bit_grayscale_scans_scale_by_65535_without_clipping(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 4), 13107, dtype=np.uint16)).save(tmp_path / "a" / "scan.png")  # 13107 = 65535 / 5
    gray(tmp_path / "b" / "photo.png", 51)  # 8-bit: 51 / 255 = 0.2 as well
    data = load_data(tmp_path, NONE, role="train")
    assert data.train.input_shape == (1, 4, 4)
    assert data.train.x[:, 0, 0, 0].tolist() == pytest.approx([0.2, 0.2])
    resized = load_data(tmp_path, DataSpec(image_size=(2, 2), normalize="none", test_fraction=0), role="train")
    assert resized.train.x[0].flatten().tolist() == pytest.approx([0.2] * 4)


def test_images_of_different_sizes_need_an_image_size(tmp_path):
    gray(tmp_path / "a" / "0.png", 1, size=(4, 4))
    gray(tmp_path / "b" / "0.png", 1, size=(5, 4))
    with pytest.raises(ValueError, match=r"differ in size \(4x4 in a/0.png, 5x4 in b/0.png\).*--image-size"):
        load_data(tmp_path, NONE)


def test_corrupt_images_are_skipped_and_reported_once(tmp_path, caplog):
    gray(tmp_path / "a" / "good.png", 1)
    gray(tmp_path / "b" / "good.png", 2)
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "b" / "worse.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "b" / "notes.txt").write_text("ignored: not an image suffix")
    with caplog.at_level(logging.WARNING, logger="insitu.data"):
        data = load_data(tmp_path, NONE, role="train")
    assert len(data.train) == 2 and data.skipped == ["a/bad.png", "b/worse.jpg"]
    messages = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert messages == [f"skipped 2 unreadable images under {tmp_path}: a/bad.png, b/worse.jpg"]


def test_empty_class_folder_loose_images_and_no_classes_are_named(tmp_path):
    gray(tmp_path / "a" / "0.png", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"class folder {tmp_path / 'empty'} has no images"):
        load_data(tmp_path, NONE)
    (tmp_path / "empty").rmdir()
    gray(tmp_path / "loose.png", 1)
    with pytest.raises(ValueError, match=r"holds images directly \(loose.png\).*one subfolder per class"):
        load_data(tmp_path, NONE)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="has no class subfolders"):
        load_data(tmp_path / "nothing", NONE)


def test_groups_are_the_first_level_folders_in_sorted_order(tmp_path):
    for group, n in (("west", 1), ("east", 2)):
        for cls in ("x", "y"):
            for i in range(n):
                gray(tmp_path / group / cls / f"{i}.png", 5)
    data = load_data(tmp_path, DataSpec(partition_by="folder", normalize="none", test_fraction=0), role="train")
    assert data.group_names == ("east", "west")
    assert [p.tolist() for p in data.group_parts()] == [[0, 1, 2, 3], [4, 5]]
    assert data.describe()["clients"] == {"0": {"group": "east", "train_examples": 4},
                                          "1": {"group": "west", "train_examples": 2}}
    with pytest.raises(ValueError, match="pass --partition-by folder"):
        load_data(tmp_path, DataSpec(partition_by="hospital"))


def test_each_group_folder_may_hold_its_own_train_and_test_split(tmp_path):
    """One folder per hospital, as deployed clients read it (ROOT/<group>/{train,test}/<class>): the groups are
    the hospitals, each one's test/ images are test rows of its own group, and a group without test/ trains on all."""
    for group, train_n, test_n in (("h1", 2, 1), ("h2", 1, 1), ("h3", 1, 0)):
        for cls in ("normal", "sick"):
            for i in range(train_n):
                gray(tmp_path / group / ("train" if test_n else "") / cls / f"{i}.png", 5)
            for i in range(test_n):
                gray(tmp_path / group / "test" / cls / f"{i}.png", 9)
    data = load_data(tmp_path, DataSpec(partition_by="folder", normalize="none"))
    assert data.group_names == ("h1", "h2", "h3") and data.classes == ("normal", "sick")
    assert [len(p) for p in data.group_parts()] == [4, 2, 2]
    assert [len(p) for p in data.group_parts(test=True)] == [2, 2, 0]
    assert data.test.x.max().item() == pytest.approx(9 / 255) and data.train.x.max().item() == pytest.approx(5 / 255)


def test_auto_normalization_uses_the_training_rows_per_channel(tmp_path):
    for name, value in (("a/0.png", 0), ("a/1.png", 102), ("b/0.png", 204)):
        gray(tmp_path / name, value)
    data = load_data(tmp_path, DataSpec(test_fraction=0), role="train")
    values = np.array([0, 102, 204]) / 255
    expected = (values - values.mean()) / values.std()
    assert data.train.x[:, 0, 0, 0].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    given = load_data(tmp_path, DataSpec(normalize="0.5/0.25", test_fraction=0), role="train")
    assert given.train.x[:, 0, 0, 0].tolist() == pytest.approx(((values - 0.5) / 0.25).tolist(), rel=1e-5)


def test_given_classes_fix_the_order_and_unknown_labels_are_refused(tmp_path):
    gray(tmp_path / "b" / "0.png", 1)
    gray(tmp_path / "c" / "0.png", 1)
    data = load_data(tmp_path, DataSpec(classes=("c", "a", "b"), normalize="none", test_fraction=0), role="train")
    assert data.classes == ("c", "a", "b") and data.train.y.tolist() == [2, 0]
    assert data.train.num_classes == 3
    with pytest.raises(ValueError, match=r"label\(s\) c are not among the classes \(a, b\).*--classes"):
        load_data(tmp_path, DataSpec(classes=("a", "b")))


def test_option_parsing():
    assert parse_image_size("64") == (64, 64) and parse_image_size("32x48") == (32, 48)
    assert parse_image_size("") is None
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_image_size("64x")
    mean, std = parse_normalize("0.1,0.2/0.3,0.4")
    assert mean.tolist() == pytest.approx([0.1, 0.2]) and std.tolist() == pytest.approx([0.3, 0.4])
    with pytest.raises(ValueError, match="MEAN/STD"):
        parse_normalize("0.5")
    with pytest.raises(ValueError, match="unknown data format 'xls'"):
        DataSpec(format="xls")


# --------------------------------------------------------------------------- tables

TABLE = "id,age,weight,label\n1,30,70.5,0\n2,40,80,2\n3,50,90,1\n"


def test_csv_features_are_the_numeric_rest_and_integer_labels_keep_their_value(tmp_path):
    data = load_data(write_csv(tmp_path / "t.csv", TABLE), DataSpec(normalize="none", test_fraction=0,
                                                                     exclude_columns=("id",)))
    assert data.train.x.tolist() == [[30, 70.5], [40, 80], [50, 90]]
    assert data.train.y.tolist() == [0, 2, 1] and data.classes == ("0", "1", "2")


def test_csv_auto_normalization_standardizes_each_feature(tmp_path):
    data = load_data(write_csv(tmp_path / "t.csv", TABLE), DataSpec(test_fraction=0, feature_columns=("age",)))
    assert data.train.x[:, 0].tolist() == pytest.approx([-1.2247449, 0.0, 1.2247449], rel=1e-5)


def test_text_labels_become_sorted_classes(tmp_path):
    path = write_csv(tmp_path / "t.csv", "x,label\n1,sick\n2,healthy\n3,sick\n")
    data = load_data(path, NONE)
    assert data.classes == ("healthy", "sick") and data.train.y.tolist() == [1, 0, 1]


def test_categorical_columns_are_named_unless_excluded(tmp_path):
    path = write_csv(tmp_path / "t.csv", "age,city,label\n1,Oslo,0\n2,Rome,1\n")
    with pytest.raises(ValueError, match=r"column\(s\) city are not numeric \(e.g. city = 'Oslo'\).*"
                                         r"--exclude-columns city"):
        load_data(path, NONE)
    assert load_data(path, DataSpec(exclude_columns=("city",), normalize="none", test_fraction=0)
                     ).train.x.tolist() == [[1], [2]]


def test_missing_values_name_the_column_and_row_count(tmp_path):
    path = write_csv(tmp_path / "t.csv", "a,b,label\n1,,0\n2,NA,1\n3,4,1\n,5,0\n")
    with pytest.raises(ValueError, match=r"'a': 1 row\(s\) \(4\); 'b': 2 row\(s\) \(1, 2\)"):
        load_data(path, NONE)


def test_a_wrong_column_is_named_with_the_columns_that_exist(tmp_path):
    path = write_csv(tmp_path / "t.csv", TABLE)
    with pytest.raises(ValueError, match=r"no column 'target' for the label \(columns: id, age, weight, label\)"):
        load_data(path, DataSpec(label_column="target"))
    with pytest.raises(ValueError, match=r"no column 'site' for the partition \(columns: id, age, weight, label\)"):
        load_data(path, DataSpec(partition_by="site"))


def test_numeric_groups_sort_as_numbers(tmp_path):
    path = write_csv(tmp_path / "t.csv", "x,region,label\n1,10,0\n2,2,1\n3,1,0\n4,2,1\n")
    data = load_data(path, DataSpec(partition_by="region", normalize="none", test_fraction=0))
    assert data.group_names == ("1", "2", "10")
    assert [data.train.x[p, 0].tolist() for p in data.group_parts()] == [[3], [2, 4], [1]]


def test_a_split_column_is_the_test_split(tmp_path):
    path = write_csv(tmp_path / "t.csv", "x,split,label\n1,train,0\n2,test,1\n3,train,1\n")
    data = load_data(path, DataSpec(normalize="none"))
    assert data.train.x.tolist() == [[1], [3]] and data.test.x.tolist() == [[2]]


def test_a_held_out_fraction_is_stratified_and_seeded(tmp_path):
    rows = "".join(f"{i},{i % 2}\n" for i in range(20))
    path = write_csv(tmp_path / "t.csv", "x,label\n" + rows)
    first = load_data(path, DataSpec(normalize="none", test_fraction=0.2, split_seed=3))
    again = load_data(path, DataSpec(normalize="none", test_fraction=0.2, split_seed=3))
    assert len(first.test) == 4 and sorted(first.test.y.tolist()) == [0, 0, 1, 1]  # 2 of each class of 10
    assert first.test.x.tolist() == again.test.x.tolist()
    assert sorted(first.train.x[:, 0].tolist() + first.test.x[:, 0].tolist()) == list(range(20))


def test_parquet_reads_like_the_same_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3], "age": [30, 40, 50], "weight": [70.5, 80.0, 90.0],
                             "label": [0, 2, 1]}), tmp_path / "t.parquet")
    spec = DataSpec(normalize="none", test_fraction=0, exclude_columns=("id",))
    table = load_data(tmp_path / "t.parquet", spec)
    csv = load_data(write_csv(tmp_path / "t.csv", TABLE), spec)
    assert table.format == "parquet"
    assert torch.equal(table.train.x, csv.train.x) and torch.equal(table.train.y, csv.train.y)
    pq.write_table(pa.table({"x": [1.0, None], "label": [0, 1]}), tmp_path / "gap.parquet")
    with pytest.raises(ValueError, match=r"'x': 1 row\(s\) \(2\)"):
        load_data(tmp_path / "gap.parquet", NONE)


def test_a_missing_optional_package_is_a_clear_error_naming_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"reading Parquet needs pyarrow: pip install 'insitu\[data\]'"):
        load_data(tmp_path / "t.parquet")


def test_separate_test_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", "x,label\n1,a\n2,b\n")
    write_csv(tmp_path / "test.csv", "x,label\n3,b\n")
    data = load_data(train, DataSpec(normalize="none", test_data=str(tmp_path / "test.csv")))
    assert data.train.x.tolist() == [[1], [2]] and data.test.x.tolist() == [[3]] and data.test.y.tolist() == [1]


# --------------------------------------------------------------------------- npz


def test_npz_keys_test_split_and_groups(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.arange(6.0).reshape(3, 2), targets=np.array([1, 0, 1]),
             inputs_test=np.ones((1, 2)), targets_test=np.array([0]), site=np.array(["b", "a", "b"]),
             site_test=np.array(["a"]))
    data = load_data(tmp_path / "d.npz", DataSpec(x_key="inputs", y_key="targets", partition_by="site",
                                                  normalize="none"))
    assert data.train.x.tolist() == [[0, 1], [2, 3], [4, 5]] and data.test.x.tolist() == [[1, 1]]
    assert data.group_names == ("a", "b") and data.train_groups.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"no array 'x' \(arrays: inputs, targets.*pass --x-key"):
        load_data(tmp_path / "d.npz")


def test_npz_uint8_channels_last_images_become_channels_first_in_0_1(tmp_path):
    x = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    x[1, :, :, 2] = 255
    np.savez(tmp_path / "img.npz", x=x, y=np.array([0, 1]))
    data = load_data(tmp_path / "img.npz", NONE)
    assert data.train.input_shape == (3, 4, 5)
    assert data.train.x[1, 2].min().item() == 1.0 and data.train.x[1, :2].max().item() == 0.0


def test_npz_never_unpickles(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))
    with pytest.raises(ValueError, match="cannot be read without pickle"):
        load_data(tmp_path / "obj.npz", NONE)


# --------------------------------------------------------------------------- Hugging Face


def _png(value):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((3, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_hugging_face_image_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})
    rows = {"image": [{"bytes": _png(v), "path": None} for v in (0, 255, 51)], "label": [1, 0, 1]}
    single = datasets.Dataset.from_dict(rows, features=features)
    single.save_to_disk(str(tmp_path / "single"))
    data = load_data(tmp_path / "single", NONE, role="train")
    assert data.format == "hf" and data.classes == ("no", "yes")
    assert data.train.y.tolist() == [1, 0, 1]
    assert data.train.x[:, 0, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.2])
    datasets.DatasetDict({"train": single, "test": single.select([0])}).save_to_disk(str(tmp_path / "dict"))
    split = load_data(tmp_path / "dict", DataSpec(normalize="none"))
    assert (len(split.train), len(split.test)) == (3, 1) and split.test.y.tolist() == [1]


def test_hugging_face_table_with_a_corrupt_image_row_skipped(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"a": [1.0, 2.0], "b": [3.0, 4.0], "label": ["x", "y"]}).save_to_disk(
        str(tmp_path / "table"))
    data = load_data(tmp_path / "table", NONE)
    assert data.train.x.tolist() == [[1, 3], [2, 4]] and data.classes == ("x", "y")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    broken = datasets.Dataset.from_dict({"img": [{"bytes": _png(9), "path": None}, {"bytes": b"junk", "path": None}],
                                         "label": [0, 1]}, features=features)
    broken.save_to_disk(str(tmp_path / "broken"))
    data = load_data(tmp_path / "broken", NONE)
    assert len(data.train) == 1 and data.skipped == ["row 1"]


# --------------------------------------------------------------------------- class agreement


def test_a_client_refuses_tasks_of_a_server_with_other_classes():
    check_classes({}, ["a", "b"])  # a server that sends no list: nothing to check
    check_classes({CLASSES_KEY: encode_classes(["a", "b"])}, ["a", "b"])
    with pytest.raises(ValueError, match=r"differ from the server's \(a, b, c\): missing here: c\. "
                                         r"Pass --classes a,b,c"):
        check_classes({CLASSES_KEY: encode_classes(["a", "b", "c"])}, ["a", "b"])
    with pytest.raises(ValueError, match="same names in another order"):
        check_classes({CLASSES_KEY: json.dumps(["b", "a"])}, ["a", "b"])

    class Inner:
        def fit(self, parameters, config):
            return "fitted"

        def evaluate(self, parameters, config):
            return "evaluated"

    wrapped = ClassCheckedClient(Inner(), ["a"])
    assert wrapped.fit(None, {CLASSES_KEY: encode_classes(["a"])}) == "fitted"
    with pytest.raises(ValueError, match="differ from the server's"):
        wrapped.evaluate(None, {CLASSES_KEY: encode_classes(["z"])})


def test_a_remote_strategy_sends_the_class_list_with_every_task():
    from insitu.simulation import SimulationConfig, make_strategy

    strategy = make_strategy(SimulationConfig(), None, remote=True,
                             data_config=agreement_config(("cat", "dog"), (1, 8, 8)))
    sent = strategy.fit_config if isinstance(strategy.fit_config, dict) else strategy.fit_config(1)
    assert json.loads(sent[CLASSES_KEY]) == ["cat", "dog"] and json.loads(sent[SHAPE_KEY]) == [1, 8, 8]
    check_shape(sent, (1, 8, 8))
    with pytest.raises(ValueError, match=r"shape 3x8x8 but the server's have 1x8x8: pass the server's --image-size "
                                         r"and --image-mode"):
        ClassCheckedClient(object(), ["cat", "dog"], (3, 8, 8)).fit(None, sent)


# --------------------------------------------------------------------------- simulation


def test_simulation_clients_are_exactly_the_groups(tmp_path):
    from insitu.simulation import SimulationConfig, build_experiment

    rows = "".join(f"{i},{['b', 'a', 'c'][i % 3]},{i % 2}\n" for i in range(30))
    path = write_csv(tmp_path / "t.csv", "x,site,label\n" + rows)
    config = SimulationConfig(data=str(path), partition_by="site", num_clients=3, model="logreg", test_fraction=0.2,
                              normalize="none")
    experiment = build_experiment(config)
    sites = np.array([["b", "a", "c"][i % 3] for i in range(30)])
    train_x = experiment.train.x[:, 0].numpy()
    for client, site in enumerate(("a", "b", "c")):
        rows_of_client = train_x[experiment.train_parts[client]].astype(int)
        assert set(sites[rows_of_client]) == {site}
    assert sum(len(p) for p in experiment.train_parts) == len(experiment.train) == 24
    assert experiment.data_info["clients"]["0"]["group"] == "a"
    with pytest.raises(ValueError, match=r"gives 3 clients \(a, b, c\) but num_clients is 5: pass --num-clients 3"):
        build_experiment(SimulationConfig(data=str(path), partition_by="site", num_clients=5, model="logreg"))
    with pytest.raises(ValueError, match="use --partition instead"):
        SimulationConfig(partition_by="site").validate()


def test_simple_cnn_trains_on_an_rgb_folder_of_another_size(tmp_path):
    from insitu.simulation import SimulationConfig, run_simulation

    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("light", 210)):
        (tmp_path / name).mkdir()
        for i in range(6):
            pixels = np.clip(rng.normal(level, 20, (12, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    config = SimulationConfig(data=str(tmp_path), model="simple-cnn", num_clients=2, rounds=1, test_fraction=0.25)
    experiment, result = run_simulation(config)
    assert experiment.train.input_shape == (3, 12, 10) and (len(experiment.train), len(experiment.test)) == (8, 4)
    assert [r.status for r in result.history.rounds] == ["ok"]


# --------------------------------------------------------------------------- hostile or broken files


def test_the_data_extras_require_pillow_and_pyarrow_without_known_cves():
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("data", "test", "dev"):
        pins = {m.group(1).lower(): tuple(int(p) for p in m.group(2).split("."))
                for m in (re.fullmatch(r"(pillow|pyarrow)>=([\d.]+)", r, re.IGNORECASE) for r in extras[extra]) if m}
        # Pillow < 10.3 bundles a libwebp with CVE-2023-4863; pyarrow 14.0.0 unpickles extension types (CVE-2023-47248)
        assert pins["pillow"] >= (10, 3) and pins["pyarrow"] >= (15,), (extra, pins)


def _write_hf(folder, table, data_files=None):
    """A save_to_disk-like folder written with pyarrow alone: one Arrow stream and its state.json."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    files = [{"filename": "data-00000-of-00001.arrow"}] if data_files is None else data_files
    (folder / "state.json").write_text(json.dumps({"_data_files": files}))
    return folder


def test_an_arrow_file_that_fails_full_validation_is_refused_by_name(tmp_path):
    pa = pytest.importorskip("pyarrow")
    offsets = pa.py_buffer(np.array([0, 1, 2], dtype=np.int32).tobytes())
    labels = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"\xff\xfe")])  # not UTF-8
    folder = _write_hf(tmp_path / "ds", pa.table({"x": [[1.0], [2.0]], "label": labels}))
    with pytest.raises(ValueError, match=r"data-00000-of-00001\.arrow is not a readable, valid Arrow file: .*UTF8"):
        load_data(folder, NONE)


def test_hugging_face_state_entries_that_are_not_objects_are_a_clear_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    folder = _write_hf(tmp_path / "ds", pa.table({"x": [[1.0]], "label": [0]}),
                       data_files=["data-00000-of-00001.arrow"])
    with pytest.raises(ValueError, match=r"state\.json: _data_files must be a list of objects with a \"filename\""):
        load_data(folder, NONE)


def test_hugging_face_list_columns_must_be_even_and_finite(tmp_path):
    pa = pytest.importorskip("pyarrow")
    ragged = _write_hf(tmp_path / "ragged", pa.table({"x": [[1.0, 2.0], [3.0]], "label": [0, 1]}))
    with pytest.raises(ValueError, match=r"column 'x' must hold a list of numbers of the same length in every row"):
        load_data(ragged, NONE)
    overflow = _write_hf(tmp_path / "overflow", pa.table({"x": [[1.0, 2.0], [3.0, 1e39]], "label": [0, 1]}))
    with pytest.raises(ValueError, match=r"feature column\(s\) 'x' hold infinite values.* in 1 row\(s\) \(2\)"):
        load_data(overflow, NONE)


def test_an_image_over_the_pixel_cap_is_skipped_before_decoding_with_the_reason(tmp_path, monkeypatch):
    import struct
    import warnings
    import zlib

    from insitu.data.files import images

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    gray(tmp_path / "a" / "ok.png", 1)
    gray(tmp_path / "b" / "ok.png", 2)
    # a 10000 x 10000 header (100 M pixels: Pillow only warns below 2 x 89.5 M) with no pixel data at all
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0))
    (tmp_path / "b" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning is not left to repeat the skip
        data = load_data(tmp_path, NONE, role="train")
    assert len(data.train) == 2
    assert data.skipped == ["b/bomb.png (10000x10000 = 100000000 pixels, over the 89478485-pixel limit)"]
    monkeypatch.setattr(images, "MAX_PIXELS", 15)  # the cap, not the decoder, refuses a 4 x 4 image
    (tmp_path / "b" / "bomb.png").unlink()
    with pytest.raises(ValueError, match=r"no readable images .*\(2 unreadable\)"):
        load_data(tmp_path, NONE, role="train")


def test_grayscale_images_beside_color_ones_become_rgb_in_auto_mode(tmp_path):
    gray(tmp_path / "a" / "0.png", 51)
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((4, 4, 3), (255, 0, 102), dtype=np.uint8)).save(tmp_path / "b" / "0.png")
    data = load_data(tmp_path, NONE, role="train")
    assert data.train.input_shape == (3, 4, 4)
    assert data.train.x[:, :, 0, 0].flatten().tolist() == pytest.approx([0.2, 0.2, 0.2, 1.0, 0.0, 0.4])


def test_an_implausible_integer_label_is_refused_instead_of_making_a_billion_classes(tmp_path):
    path = write_csv(tmp_path / "t.csv", "x,label\n1,0\n2,1\n3,1000000000\n")
    with pytest.raises(ValueError, match=r"largest integer label is 1000000000.*3 distinct.*--classes / --num-classes"):
        load_data(path, NONE)
    data = load_data(write_csv(tmp_path / "ok.csv", "x,label\n1,0\n2,999\n"), NONE)  # 1000 classes: still allowed
    assert len(data.classes) == 1000 and data.train.y.tolist() == [0, 999]


def test_infinite_and_float32_overflowing_features_name_the_columns_and_rows(tmp_path):
    path = write_csv(tmp_path / "t.csv", "a,b,c,ok,label\n1,inf,1,1,0\n2,2,1e39,1,1\n3,3,3,1,0\n1e999,4,4,1,1\n")
    with pytest.raises(ValueError, match=r"feature column\(s\) 'a', 'b', 'c' hold infinite values.* in 3 row\(s\) "
                                         r"\(1, 2, 4\)"):
        load_data(path, NONE)
    for bad in ("nan/1", "0/inf", "1e39/1", "0/1e39", "0,1/1,-inf"):
        with pytest.raises(ValueError, match="each std > 0"):
            parse_normalize(bad)


def test_an_excluded_parquet_id_column_beyond_2_53_does_not_stop_the_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": pa.array([2**53 + 1, 2**62], pa.int64()), "x": [1.0, 2.0], "label": [0, 1]}),
                   tmp_path / "t.parquet")
    data = load_data(tmp_path / "t.parquet", DataSpec(normalize="none", test_fraction=0, exclude_columns=("id",)))
    assert data.train.x.tolist() == [[1.0], [2.0]]
    with pytest.raises(ValueError, match=r"column\(s\) id are not numeric \(e.g. id = '9007199254740993'\)"):
        load_data(tmp_path / "t.parquet", NONE)


def test_a_csv_field_over_the_csv_module_limit_names_the_file_and_line(tmp_path):
    path = write_csv(tmp_path / "t.csv", "x,label\n1,0\n" + "2," + "a" * 131_073 + "\n")
    with pytest.raises(ValueError, match=rf"{path.name}:3: not readable as CSV \(field larger than field limit"):
        load_data(path, NONE)
