"""`hydro up --artifact-store s3://...`: a model pushed into a bucket is served, and served again after the
machine lost every local copy of it (the deployer fetches it back from the bucket and checks its digest).

The bucket is on SeaweedFS (`weed mini`, tests/s3_server.py), a real S3-compatible server standing in for AWS S3
or MinIO, which is what production points at (docs/artifacts.md).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from hydro_mesh import EXPECTED, Mesh, running_mesh
from s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3, aws_env

from manager_api.processes import wait_until

pytestmark = pytest.mark.e2e


def _labels(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    return [int(x) for x in np.asarray(outputs["label"]["data"]).ravel()]


def _serves(mesh: Mesh) -> None:
    wait_until(lambda: mesh.infer().status_code == 200, 120, "iris through the ingress")
    assert _labels(mesh.infer()) == EXPECTED


def test_a_model_in_the_bucket_is_served_and_refetched_after_the_local_copies_are_gone(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with SeaweedS3(tmp_path_factory.mktemp("s3")) as s3:
        data_dir = tmp_path_factory.mktemp("hydro")
        args = ["--artifact-store", f"s3://{s3.bucket}/e2e", "--s3-endpoint", s3.endpoint]
        env = aws_env(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        with running_mesh(data_dir, extra_args=args, env=env) as mesh:
            version = mesh.api.push_model("iris", model_dir)
            hexdigest = version["artifact"]["digest"].split(":", 1)[1]
            assert version["artifact"]["uri"] == f"s3://{s3.bucket}/e2e/sha256/{hexdigest}"
            archive = s3.client().get_object(Bucket=s3.bucket, Key=f"e2e/sha256/{hexdigest}")["Body"].read()
            assert hashlib.sha256(archive).hexdigest() == hexdigest
            mesh.api.deploy("iris", 1, replicas=1)
            mesh.api.put_application("iris", [("iris", 1, 100)])
            _serves(mesh)
        # The disk cache of archives and unpacked folders is lost; etcd (the desired state) is kept.
        shutil.rmtree(data_dir / "artifacts")
        with running_mesh(data_dir, extra_args=args, env=env) as mesh:
            _serves(mesh)
            assert (data_dir / "artifacts" / "folders" / "sha256" / hexdigest / "serving.yaml").is_file()
