"""`sdmprune eval --tasks` with the real lm-eval, offline: a local multiple-choice task (a JSONL and a
YAML the test writes) named through --include-path; its accuracy is read back from the JSON. Unknown
tasks and missing task files are one line. Skipped only where lm-eval is not installed (CI installs
the eval extra)."""
import json
import textwrap

import pytest

from conftest import make_byte_tokenizer, tiny_model
from sdmprune.cli import main

pytest.importorskip("lm_eval")

ROWS = [("The sky on a clear day is", [" blue", " green", " loud"], 0),
        ("Two plus two equals", [" four", " seven", " a tree"], 0),
        ("Ice is", [" cold", " hot", " purple"], 0),
        ("Birds can", [" fly", " read", " melt"], 0)]


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    import datasets

    # lm-eval loads the JSONL through datasets: keep its cache in the test's folder
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "wikimc.jsonl").write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a})
                                                  for q, c, a in ROWS) + "\n")
    (tasks / "wikimc.yaml").write_text(textwrap.dedent(f"""\
        task: wikimc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tasks / 'wikimc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            higher_is_better: true
        """))
    model = tiny_model(seed=2)
    model.save_pretrained(tmp_path / "m")
    make_byte_tokenizer().save_pretrained(tmp_path / "m")
    return tmp_path


def test_local_task_through_include_path(local_task, capsys):
    out = local_task / "ev.json"
    code = main(["eval", str(local_task / "m"), "--tasks", "wikimc", "--include-path", str(local_task / "tasks"),
                 "--num-fewshot", "0", "--json", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0, cap.err[-2000:]
    result = json.loads(out.read_text())
    acc = result["tasks"]["wikimc"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and "acc_stderr,none" in result["tasks"]["wikimc"]
    assert result["lm_eval"]["tasks"] == ["wikimc"] and result["lm_eval"]["num_fewshot"] == 0


@pytest.mark.parametrize("tasks,extra,fragment", [
    ("no_such_task_anywhere", ["--include-path", "{tasks}"], "knows no task"),
    ("{tasks}/missing.yaml", [], "does not exist"),
    ("wikimc", ["--include-path", "{tasks}/nope"], "is not a folder"),
])
def test_task_errors_are_one_line(local_task, capsys, tasks, extra, fragment):
    fill = {"tasks": str(local_task / "tasks")}
    code = main(["eval", str(local_task / "m"), "--tasks", tasks.format(**fill)]
                + [e.format(**fill) for e in extra] + ["--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
