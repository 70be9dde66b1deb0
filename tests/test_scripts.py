"""Every shell script we ship runs, at toy sizes: demo.sh and tools/real.sh (tools/table2a.sh's commands are
parsed). bash runs the script itself (its cd, loops, links and variables) with `python3` shadowed by a function that
records each command; the commands are then run in this process, in order, by the scripts' own main() (a fresh
interpreter per command would cost seconds of imports each on the test machine)."""
import os
import runpy
import shutil
import subprocess
import sys

import common
import synthetic
from conftest import ROOT

SHIM = r'''
python3() {
    local n; n=$(ls "$SHIM_DIR" | grep -c args || true)
    local f; f=$SHIM_DIR/$(printf %03d "$n")
    printf '%s\0' "$PWD" "$@" > "$f.args"
    if [ "$1" = - ]; then cat > "$f.stdin"; fi
}
export -f python3
'''


def recorded_commands(script, env, shim_dir):
    """Run `script` under bash with python3 recorded; returns [(cwd, argv, stdin or None)] in order."""
    shim_dir.mkdir()
    res = subprocess.run(["bash", "-c", SHIM + f'bash "{script}"'], capture_output=True, text=True,
                         env={**os.environ, **env, "SHIM_DIR": str(shim_dir)})
    assert res.returncode == 0, res.stderr
    cmds = []
    for f in sorted(shim_dir.glob("*.args")):
        cwd, *argv = f.read_text().split("\0")[:-1]
        stdin = f.with_suffix(".stdin")
        cmds.append((cwd, argv, stdin.read_text() if stdin.exists() else None))
    return cmds


def replay(cmds, monkeypatch):
    """Each recorded `python3 X.py ...`, `python3 -c CODE` or `python3 - ARGS <<EOF` in its folder, in this process."""
    for cwd, argv, stdin in cmds:
        monkeypatch.chdir(cwd)
        if argv[0] == "-c":
            exec(compile(argv[1], "<python3 -c>", "exec"), {})
        elif argv[0] == "-":
            monkeypatch.setattr(sys, "argv", argv)
            exec(compile(stdin, "<python3 ->", "exec"), {"__name__": "__main__"})
        else:  # a script, as its __main__ (its imports are already loaded)
            monkeypatch.setattr(sys, "argv", argv)
            runpy.run_path(argv[0], run_name="__main__")
    return [argv[0] for _, argv, _ in cmds]


def test_demo_sh_runs_at_toy_size(tmp_path, monkeypatch, capsys):
    env = {"OUT": str(tmp_path / "demo"), "N_TRAIN": "12", "N_VAL": "6", "IMG": "32", "NET": "32", "BATCH": "4",
           "PT_EPOCHS": "1", "LC_EPOCHS": "1", "FT_ITERS": "1", "FT_SPLITS": "1"}
    ran = replay(recorded_commands(ROOT / "demo.sh", env, tmp_path / "shim"), monkeypatch)
    assert ran == ["tools/synthetic.py", "mine_masks.py", "pretrain.py", "linear_eval.py", "linear_eval.py",
                   "kmeans_eval.py", "kmeans_eval.py", "finetune.py", "-"]
    printed = capsys.readouterr().out
    assert "protocol (mIoU %, synthetic val)" in printed and "fine-tuning, 2% of the labels" in printed


def test_real_sh_runs_at_toy_size_on_generated_data(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    synthetic.make_synthetic_voc(data / "voc_mini", n_train=12, n_val=6, size=32, seed=3)
    (data / "duts_tr" / "images").mkdir(parents=True)
    for f in sorted((data / "voc_mini" / "JPEGImages").glob("train_*"))[:4]:
        shutil.copy(f, data / "duts_tr" / "images" / f"duts_{f.name}")
    env = {"CPU": "1", "DATA": str(data), "OUT": str(tmp_path / "real"), "ARCH": "resnet18", "DUTS": "3",
           "ROUNDS": "0", "MINE_EPOCHS": "1", "PT_SIZE": "32", "PT_BATCH": "4", "PT_EPOCHS": "1", "EVAL_SIZE": "32",
           "LC_EPOCHS": "1", "LC_STEP": "1", "FT_ITERS": "1", "FT_SIZE": "32", "WORKERS": "0"}
    cmds = recorded_commands(ROOT / "tools" / "real.sh", env, tmp_path / "shim")
    assert len(list((tmp_path / "real" / "duts").iterdir())) == 3  # bash linked the first $DUTS images
    ran = replay(cmds, monkeypatch)  # (masks from the priors: a network of one toy epoch predicts no object yet)
    assert ran == ["mine_masks.py", "pretrain.py", "linear_eval.py", "kmeans_eval.py", "linear_eval.py",
                   "kmeans_eval.py", "finetune.py", "-"]
    printed = capsys.readouterr().out
    assert "protocol (mIoU %, voc_mini val)" in printed and "fine-tuning, 100% of the labels" in printed


def test_table2a_sh_commands_parse(tmp_path):
    """tools/table2a.sh's 21 commands parse as its scripts' flags and its table code compiles; it is not run here: a
    toy-sized run takes 20 s, and its network pretrained on hierarchical regions predicts no foreground at that size,
    which kmeans_eval.py refuses."""
    cmds = recorded_commands(ROOT / "tools" / "table2a.sh", {"OUT": str(tmp_path / "t2a")}, tmp_path / "shim")
    scripts = [argv[0] for _, argv, _ in cmds]
    assert scripts == ["tools/synthetic.py"] + ["mine_masks.py", "pretrain.py"] * 3 + \
        (["linear_eval.py"] + ["kmeans_eval.py"] * 2) * 4 + ["-"]
    for _, argv, _ in cmds[1:-1]:
        __import__(argv[0][:-3]).get_args(argv[1:])  # an unknown flag or value exits
    compile(cmds[-1][2], "table2a.sh's table", "exec")
