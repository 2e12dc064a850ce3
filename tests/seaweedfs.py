"""The SeaweedFS launcher the tests share with the bench (`node.bench.seaweedfs`)."""

from node.bench.seaweedfs import SeaweedFS, s3_environment, seaweedfs, weed_binary, weed_unusable

__all__ = ["SeaweedFS", "s3_environment", "seaweedfs", "weed_binary", "weed_unusable"]
