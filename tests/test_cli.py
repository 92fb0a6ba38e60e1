"""The `hotpeft` command as a subprocess."""
import subprocess
import sys

from hotpeft.server.config import Settings


def hotpeft(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "hotpeft.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_subcommands_and_every_serve_flag():
    top = hotpeft("--help")
    assert top.returncode == 0 and "serve" in top.stdout
    serve = hotpeft("serve", "--help")
    assert serve.returncode == 0
    out = " ".join(serve.stdout.split())
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out and "HOTPEFT_" + name.upper() in out


def test_bad_flag_value_names_the_flag():
    r = hotpeft("serve", "--quantize", "fp3")
    assert r.returncode == 2 and "--quantize" in r.stderr and "'none'" in r.stderr
    r = hotpeft("serve", "--compile", "fast")
    assert r.returncode == 2 and "--compile" in r.stderr and all(f"'{v}'" in r.stderr for v in ("auto", "off", "on"))


def test_missing_model_directory_is_a_clear_error(tmp_path):
    r = hotpeft("serve", "--model", str(tmp_path / "nope"), "--home", str(tmp_path / "home"), "--port", "1")
    assert r.returncode != 0 and "no such directory" in r.stderr


def test_unreachable_hub_id_says_so(tmp_path):
    import os
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = hotpeft("serve", "--model", "someone/some-model", "--home", str(tmp_path / "home"), "--port", "1", env=env)
    assert r.returncode != 0 and "hub could not provide it" in r.stderr and "local model directory" in r.stderr


def test_an_object_storage_url_as_store_is_refused_not_made_a_folder(tmp_path):
    r = hotpeft("serve", "--store-dir", "s3://bucket/adapters", "--home", str(tmp_path / "home"), "--port", "1")
    assert r.returncode == 2 and "--store-dir 's3://bucket/adapters' is a URL" in r.stderr and "--store-url" in r.stderr
    assert not (tmp_path / "s3:").exists() and not __import__("pathlib").Path("s3:").exists()


def test_a_store_url_must_be_a_url_of_a_known_protocol(tmp_path):
    r = hotpeft("serve", "--store-url", str(tmp_path / "bucket"), "--home", str(tmp_path / "home"), "--port", "1")
    assert r.returncode == 2 and "--store-url" in r.stderr and "is not a URL" in r.stderr
    r = hotpeft("serve", "--store-url", "nosuchproto://bucket/x", "--home", str(tmp_path / "home"), "--port", "1")
    assert r.returncode == 2 and "--store-url 'nosuchproto://bucket/x'" in r.stderr


def test_help_and_the_http_clients_start_without_torch():
    """`hotpeft --help`, `hotpeft adapters ...` and `hotpeft loadtest` are HTTP clients or listings: they must
    not pay for importing torch (nor SQLAlchemy). Checked on the interpreter's own import log."""
    for args in (["--help"], ["adapters", "--help"], ["adapters", "list", "--help"], ["loadtest", "--help"],
                 ["train", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "hotpeft.cli", *args], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "hotpeft" in imported and "argparse" in imported  # the log is what we think it is
        assert not imported & {"torch", "transformers", "peft", "sqlalchemy"}, (args, imported & {"torch"})
