"""The peer of the end-to-end benchmark (benches/e2e.rs): the identity job written the plain
way with confluent-kafka, Confluent's Python client (librdkafka underneath, like inferflow).

It does what inferflow's `identity` pipeline does for a valid request, with the same delivery
guarantee: consume a batch, parse each request as JSON, check it names a request id and the
`identity` pipeline, answer `{"request_id", "status": "ok", "output": data, ...}` keyed by the
request id on the results topic (idempotent producer, acks=all, linger.ms=5 as inferflow's),
wait for the broker's acknowledgements, then store the batch's offsets for the auto-commit
(at least once). Requests without a readable id go to the dead-letter topic unchanged.

    python identity.py BOOTSTRAP GROUP REQUESTS_TOPIC RESULTS_TOPIC DLQ_TOPIC

Runs until SIGTERM or SIGINT. The driver (`scripts/bench`) installs confluent-kafka into a
virtual environment first.
"""

import json
import signal
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

BATCH = 256  # inferflow's default batch.max_records
POLL_TIMEOUT_S = 0.02  # inferflow's default batch.linger_ms


def main():
    bootstrap, group, requests, results, dlq = sys.argv[1:6]
    running = True

    def stop(_signum, _frame):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": "peer-python",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "enable.auto.offset.store": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "queued.max.messages.kbytes": 16384,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "peer-python",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    consumer.subscribe([requests])
    failed = []

    def delivered(err, _msg):
        if err is not None:
            failed.append(err)

    while running:
        messages = consumer.consume(num_messages=BATCH, timeout=POLL_TIMEOUT_S)
        if not messages:
            continue
        started = time.monotonic()
        positions = {}
        for msg in messages:
            if msg.error():
                raise KafkaException(msg.error())
            value = msg.value()
            request_id = None
            try:
                request = json.loads(value)
                request_id = request.get("request_id")
                if not isinstance(request_id, str) or not request_id:
                    request_id = None
                    raise ValueError("no request_id")
                if request.get("pipeline") != "identity" or "data" not in request:
                    raise ValueError("not an identity request")
                result = {
                    "request_id": request_id,
                    "status": "ok",
                    "output": request["data"],
                    "pipeline": "identity",
                    "cached": False,
                    "latency_ms": int((time.monotonic() - started) * 1000),
                    "steps": [{"name": "identity", "latency_us": 0, "cached": False}],
                    "source": {
                        "topic": msg.topic(),
                        "partition": msg.partition(),
                        "offset": msg.offset(),
                    },
                }
                topic, key, out = results, request_id, json.dumps(result)
            except (ValueError, AttributeError) as exc:
                if request_id is None:
                    topic, key, out = dlq, msg.key(), value
                else:
                    error = {"kind": "invalid_request", "message": str(exc)}
                    topic, key = results, request_id
                    out = json.dumps({"request_id": request_id, "status": "error", "error": error})
            while True:
                try:
                    producer.produce(topic, key=key, value=out, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.005)
            producer.poll(0)
            positions[(msg.topic(), msg.partition())] = msg.offset() + 1
        # At least once: store the batch's positions only once every output is acknowledged.
        producer.flush()
        if failed:
            raise KafkaException(failed[0])
        consumer.store_offsets(
            offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()]
        )
    producer.flush(5)
    consumer.close()


if __name__ == "__main__":
    main()
