import json
from pathlib import Path

from ghindex.demo import demo, format_summary
from ghindex_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def small_demo_data(tmp_path: Path, per_class=(12, 3)) -> Path:
    src = ROOT / "data" / "cifar10-demo"
    for split, n in zip(("database", "query"), per_class):
        for class_dir in sorted((src / split).iterdir()):
            target = tmp_path / "data" / split / class_dir.name
            target.mkdir(parents=True)
            for f in sorted(class_dir.glob("*.jpg"))[:n]:
                (target / f.name).symlink_to(f)
    return tmp_path / "data"


def test_demo_runs_end_to_end_and_reports(tmp_path):
    data = small_demo_data(tmp_path)
    summary = demo(out=tmp_path / "out", data=data, epochs=1, progress=False)
    assert summary["database"] == 120 and summary["queries"] == 30
    assert 0 <= summary["random_codes_map"] <= 1 and 0 <= summary["map"] <= 1
    assert len(summary["grid_relevant_of_8"]) == 10  # one query per class, framed by label
    assert all(0 <= n <= 8 for n in summary["grid_relevant_of_8"])
    for key in ("model", "database_codes", "query_codes", "report", "grid", "plot_pr"):
        assert Path(summary["files"][key]).exists(), key
    assert "mAP@all of random codes" in format_summary(summary)
    out = tmp_path / "out"
    assert format_summary(summary).splitlines()[-1] == f"  ghindex serve --index {out / 'index'} --model {out / 'model.ghm'}"


def test_demo_cli_json_and_bad_data(runner, tmp_path):
    data = small_demo_data(tmp_path, per_class=(6, 1))
    result = runner.invoke(cli, ["demo", "--data", str(data), "--out", str(tmp_path / "o"), "--epochs", "1",
                                 "--no-progress", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["queries"] == 10
    result = runner.invoke(cli, ["demo", "--data", str(tmp_path), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 1 and "must hold database/<class>/" in result.output
