import pytest

from insitu.data.tabular import load_csv


def test_csv_round_trip_and_label_range(tmp_path):
    path = tmp_path / "bank.csv"
    path.write_text("age,income,label\n30,1.5,0\n40,2.5,2\n\n50,3.5,1\n")
    data = load_csv(path)
    assert data.x.shape == (3, 2) and data.y.tolist() == [0, 2, 1] and data.num_classes == 3
    assert data.x[1].tolist() == [40.0, 2.5]
    assert load_csv(path, num_classes=5).num_classes == 5


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("a,b\n1,2\n", {}, "no column 'label' \\(columns: a, b\\); pass --label-column"),
        ("a,label\n1\n", {}, "bank.csv:2: 1 values, header has 2"),
        ("a,label\nx,1\n", {}, "bank.csv:2: could not convert"),
        ("a,label\n1,-1\n", {}, "labels must be integers >= 0"),
        ("a,label\n1,3\n", {"num_classes": 2}, "label 3 is out of range for 2 classes"),
        ("a,label\n", {}, "has a header but no examples"),
        ("", {}, "is empty"),
    ],
)
def test_bad_csv_files_are_named_with_the_problem(tmp_path, text, kwargs, message):
    path = tmp_path / "bank.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_csv(path, **kwargs)


def test_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CSV file at"):
        load_csv(tmp_path / "nope.csv")
