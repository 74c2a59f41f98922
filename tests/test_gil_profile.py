"""scripts/gil_profile.py reads py-spy's raw collapsed stacks: samples per thread, inclusive
frames counted once per stack, own time at the leaf, and --only filtering."""

from __future__ import annotations

from scripts.gil_profile import frame_name, main, read

RAW = "\n".join([
    "thread (101): AsyncIO Thread: default;run (threading.py:982);completions (api/routes.py:80);"
    "_parse_body (api/routes.py:170) 3",
    "thread (101): AsyncIO Thread: default;run (threading.py:982);completions (api/routes.py:81);"
    "_decode (api/serving.py:12);_decode (api/serving.py:20) 2",
    "thread (202): shardserve-outputs;run (threading.py:982);_get_outputs (cluster/engine_client.py:374) 5",
])


def test_reads_threads_inclusive_and_own_samples(tmp_path):
    path = tmp_path / "rep.txt"
    path.write_text(RAW + "\n")
    threads, inclusive, own, total = read(path)
    assert total == 10
    assert threads == {"thread : AsyncIO Thread: default": 5, "thread : shardserve-outputs": 5}
    assert inclusive["threading.py:run"] == 10 and inclusive["routes.py:completions"] == 5
    assert inclusive["serving.py:_decode"] == 2  # a recursive frame counts once per stack
    assert own == {"routes.py:_parse_body": 3, "serving.py:_decode": 2, "engine_client.py:_get_outputs": 5}


def test_frame_names_drop_paths_and_lines():
    assert frame_name("put (ray/_private/worker.py:3084)") == "worker.py:put"
    assert frame_name("<module>") == "<module>"


def test_only_filters_the_inclusive_rows(tmp_path, capsys):
    path = tmp_path / "rep.txt"
    path.write_text(RAW)
    main([str(path), "--only", "serving|engine_client", "--seconds", "5"])
    out = capsys.readouterr().out
    inclusive = out.split("-- inclusive")[1].split("-- own")[0]
    assert "serving.py:_decode" in inclusive and "routes.py:completions" not in inclusive
    assert "10 samples holding the GIL (2 a second)" in out
