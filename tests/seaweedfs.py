"""The SeaweedFS launcher the tests share with the bench (`node.bench.seaweedfs`), and a boto3
client of its S3 gateway for tests that look at or tamper with the stored objects."""

from node.bench.seaweedfs import SeaweedFS, s3_environment, seaweedfs, weed_binary, weed_unusable

__all__ = ["SeaweedFS", "s3_client", "s3_environment", "seaweedfs", "weed_binary", "weed_unusable"]


def s3_client(endpoint: str):
    import boto3

    env = s3_environment(endpoint)
    return boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"],
    )  # fmt: skip
