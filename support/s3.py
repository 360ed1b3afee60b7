"""A real S3-compatible server (moto's standalone server) in a subprocess on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import boto3

from support.net import free_port

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


class S3Server:
    """moto's standalone S3-compatible HTTP server in a subprocess on loopback.

    `env` holds the variables that point boto3/s3fs at it; `stop()`/`start()` simulate an outage
    (moto keeps no state across restarts)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_ENDPOINT_URL_S3": self.endpoint}
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self):
        """A boto3 S3 client of this server."""
        return boto3.client("s3", endpoint_url=self.endpoint, **CREDENTIALS)

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)
