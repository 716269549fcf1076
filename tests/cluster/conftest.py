"""A cluster for each test (tests/cluster/clusters.py): a redis-server and three node processes."""

import pytest
from clusters import running_cluster


@pytest.fixture
async def cluster(tmp_path):
    async with running_cluster(tmp_path) as running:
        yield running
