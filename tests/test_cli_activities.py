"""`paigeant activities`: what the live workers on a broker serve, as another process reads the registry."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    MessageSigner,
    NonRetryableError,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai._cli_activities import (
    _table,  # pyright: ignore[reportPrivateUsage]
    activity_rows,
)
from paigeant_ai._registry import AdvertisedActivity, LiveRegistry, WorkerRecord
from paigeant_ai.cli import _parser, main
from paigeant_ai.transports.redis import RedisTransport

from .brokers import REDIS_URL, wait_until
from .test_cli_cancel import namespace, paigeant

__all__ = ("namespace",)  # the fixture: this test's Redis namespace, with a key every process signs with and trusts


@activity(name="score-lead")
async def score_lead(ctx: ActivityContext) -> dict[str, int]:
    return {"score": 1}


score_lead.version = "3.0.1"  # pyright: ignore[reportAttributeAccessIssue]


@activity(name="score-lead")
async def score_lead_v4(ctx: ActivityContext) -> dict[str, int]:
    return {"score": 4}


score_lead_v4.version = "4.0.0"  # pyright: ignore[reportAttributeAccessIssue]


def test_activities_takes_json_and_the_connection_options() -> None:
    args = _parser().parse_args(["--transport", "redis", "activities", "--json"])
    assert (args.command, args.transport, args.json) == ("activities", "redis", True)


def test_activities_refuses_the_in_memory_transport_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["activities", "--transport", "inmemory"]) == 2
    assert capsys.readouterr().err.startswith("paigeant: an in-memory registry lives in the process of its workers")


@pytest.mark.redis
async def test_the_command_lists_live_workers_versions_and_heartbeats(namespace: str) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        old = Worker(transport, [score_lead], concurrency=2)
        new = Worker(transport, [score_lead_v4], concurrency=3)
        async with old, new:
            await wait_until(lambda: old.advertiser._task is not None, within=10, what="a heartbeat")  # pyright: ignore[reportPrivateUsage]
            await wait_until(lambda: new.advertiser._task is not None, within=10, what="a heartbeat")  # pyright: ignore[reportPrivateUsage]
            code, out = await paigeant("activities", "--json")
            assert code == 0, out
            [row] = json.loads(out[out.index("[") :])
            assert row["name"] == "score-lead"
            assert row["versions"] == ["3.0.1", "4.0.0"]
            assert row["concurrency"] == 5
            last = datetime.fromisoformat(row["last_heartbeat"])
            assert timedelta(0) <= datetime.now(UTC) - last < timedelta(seconds=30)  # the newest of the two posts
            assert last == max(datetime.fromisoformat(worker["heartbeat"]) for worker in row["workers"])
            assert sorted(worker["worker_id"] for worker in row["workers"]) == sorted(
                [old.advertiser.worker_id, new.advertiser.worker_id]
            )
            code, out = await paigeant("activities")
            assert code == 0, out
            header, line = out.strip().splitlines()[-2:]
            assert header.split() == ["ACTIVITY", "WORKERS", "CONCURRENCY", "VERSIONS", "LAST", "HEARTBEAT", "RULES"]
            assert line.split()[:5] == ["score-lead", "2", "5", "3.0.1,", "4.0.0"]
        code, out = await paigeant("activities", "--json")
        [row] = json.loads(out[out.index("[") :])
        assert (row["workers"], row["versions"]) == ([], [])  # both stopped: on record, serving nothing


def advertised(worker_id: str, heartbeat: datetime, activities: list[AdvertisedActivity]) -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, interval=1, heartbeat=heartbeat, activities=activities)


def test_each_activity_shows_its_ordering_rules_as_the_newest_live_worker_advertises_them() -> None:
    now = datetime.now(UTC)
    ship = AdvertisedActivity(
        spec=ActivitySpec(name="ship-order"), after=["take-payment"], conflicts=["refund-order"], max_per_plan=1
    )
    older_ship = AdvertisedActivity(spec=ActivitySpec(name="ship-order"), after=["old-step"])
    refund = AdvertisedActivity(spec=ActivitySpec(name="refund-order"), requires=["notify-customer"], max_per_plan=2)
    records = [
        advertised("stopped", now, [older_ship]).model_copy(update={"stopped": True}),  # newest, but serves nothing
        advertised("live", now - timedelta(seconds=0.5), [ship, refund]),
        advertised("older-release", now - timedelta(seconds=0.5), [AdvertisedActivity(spec=ActivitySpec(name="pay"))]),
    ]
    rows = activity_rows(LiveRegistry(records=records, now=now))
    rules = {row["name"]: {key: row[key] for key in ("after", "requires", "conflicts", "max_per_plan")} for row in rows}
    assert rules == {
        "pay": {"after": [], "requires": [], "conflicts": [], "max_per_plan": None},
        "refund-order": {"after": [], "requires": ["notify-customer"], "conflicts": [], "max_per_plan": 2},
        "ship-order": {"after": ["take-payment"], "requires": [], "conflicts": ["refund-order"], "max_per_plan": 1},
    }
    assert json.loads(json.dumps(rows)) == rows  # what --json prints
    lines = _table(rows).splitlines()
    assert lines[0].split()[-1] == "RULES"
    assert [line.split("UTC", 1)[1].strip() for line in lines[1:]] == [
        "-",
        "requires notify-customer; at most 2 times",
        "after take-payment; conflicts refund-order; at most once",
    ]


def test_an_activity_whose_workers_all_stopped_shows_the_rules_of_the_newest_record() -> None:
    now = datetime.now(UTC)
    newest = AdvertisedActivity(spec=ActivitySpec(name="ship-order"), after=["take-payment"])
    oldest = AdvertisedActivity(spec=ActivitySpec(name="ship-order"), after=["old-step"])
    records = [
        advertised("a", now - timedelta(minutes=2), [newest]),
        advertised("b", now - timedelta(minutes=3), [oldest]),
    ]
    [row] = activity_rows(LiveRegistry(records=records, now=now))
    assert (row["workers"], row["after"]) == ([], ["take-payment"])


async def post_dead_worker(transport: RedisTransport, security: MessageSigner, activity_name: str) -> datetime:
    """Put on the registry the record of a worker of `activity_name` last heard from two minutes ago; that time."""
    died = datetime.now(UTC) - timedelta(minutes=2)
    spec = ActivitySpec(name=activity_name)
    record = WorkerRecord(worker_id="w-dead", interval=1, heartbeat=died, activities=[AdvertisedActivity(spec=spec)])
    await transport.registry_board().post("w-dead", record.sign(security).to_bytes(), ttl=600)
    return died


@pytest.mark.redis
async def test_workflows_shows_a_workflow_whose_worker_died_as_stalled_with_when_it_was_last_seen(
    namespace: str,
) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        security = MessageSigner.from_settings(transport)
        died = await post_dead_worker(transport, security, "score-lead")
        stuck = await WorkflowDispatcher(transport, security=security).dispatch_workflow(["score-lead"], {})
    code, out = await paigeant("workflows")
    assert code == 0, out
    [row] = [line for line in out.splitlines() if stuck in line]
    assert row.split()[0] == "stalled"
    assert f"no worker serves 'score-lead' (last seen {died:%Y-%m-%d %H:%M:%S} UTC)" in row
    code, out = await paigeant("status", stuck)
    assert code == 0, out
    assert f"stalled: no worker serves 'score-lead' (last seen {died:%Y-%m-%d %H:%M:%S} UTC)" in out


@activity(name="charge-lead")
async def charge_lead(ctx: ActivityContext) -> dict[str, int]:
    return {"charged": 1}


@activity(name="ship-lead")
async def ship_lead(ctx: ActivityContext) -> dict[str, int]:
    raise NonRetryableError("no carrier")


@pytest.mark.redis
async def test_workflows_shows_a_compensating_workflow_whose_compensation_has_no_live_worker_as_stalled(
    namespace: str,
) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        security = MessageSigner.from_settings(transport)
        await post_dead_worker(transport, security, "refund-lead")
        route = [ActivitySpec(name="charge-lead", compensate="refund-lead"), ActivitySpec(name="ship-lead")]
        stuck = await WorkflowDispatcher(transport, security=security).dispatch_workflow(route, {})
        await Worker(transport, [charge_lead, ship_lead], security=security).run(burst=True)
    code, out = await paigeant("workflows")
    assert code == 0, out
    [row] = [line for line in out.splitlines() if stuck in line]
    assert row.split()[0] == "stalled"
    assert "no worker serves 'refund-lead' (last seen " in row
