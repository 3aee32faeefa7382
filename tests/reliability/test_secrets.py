"""Secrets stay secret: ``lgca label`` on the loopback S3 with a local Ray, and a distinctive
secret key and session token in its environment, leaves them in no file of the Ray session, no
object of the output (rows, run record, ledger) and nothing the command prints."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from tests.reliability.common import label_args, lgca_process, photo_bytes
from tests.support import s3_client, upload


def test_no_secret_in_ray_session_files_output_or_console(moto_endpoint, bucket, tiny_checkpoint, tmp_path):
    secret_key, session_token = f"SECRETXYZ123-{secrets.token_hex(8)}", f"TOKENQWE987-{secrets.token_hex(8)}"
    objects = {f"photos/{i}.jpg": payload for i, payload in enumerate(photo_bytes(3))}
    objects["photos/broken.jpg"] = b"\xff\xd8 not a photo"  # an error row, with the stage's message
    upload(moto_endpoint, bucket, objects)
    ray_root = Path(tempfile.mkdtemp(prefix="lgca-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env.update(AWS_ACCESS_KEY_ID="lgca-test-key", AWS_SECRET_ACCESS_KEY=secret_key, AWS_SESSION_TOKEN=session_token,
               AWS_ENDPOINT_URL=moto_endpoint, AWS_EC2_METADATA_DISABLED="true", RAY_TMPDIR=str(ray_root))
    try:
        log = tmp_path / "lgca.log"
        driver = lgca_process(label_args([f"s3://{bucket}/photos/"], f"s3://{bucket}/labels", tiny_checkpoint),
                              log, env)
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
        console = log.read_text()
        # the workers read S3 with the credentials a local Ray inherits from the driver: none travelled
        assert "3 ok, 1 error rows" in console
        session_files = [path for path in ray_root.rglob("*") if path.is_file()]
        assert any("ray-data" in path.name for path in session_files)  # the logs a runtime_env reached
        client = s3_client(moto_endpoint)
        keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="labels/")["Contents"]]
        assert any("/_lgca/runs/" in key for key in keys) and any("/data/" in key for key in keys)
        written = {str(path): path.read_bytes() for path in session_files}
        written.update({key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys})
        written["console"] = console.encode()
        for value in (secret_key, session_token):
            assert [where for where, content in written.items() if value.encode() in content] == []
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
