# Profiling harness for the request path (BENCHMARKS.md, issue #14): pre-loads N identity
# requests into a fresh 6-partition topic, runs `inferflow run` (BIN) on them, reports the rate
# seen by a Python collector and the processor CPU per request between the 10 % mark and the last
# result, and with PERF=file records 5 s of `perf record -F 499 -g` meanwhile. Needs
# `scripts/stack up` and the bench venv: N=200000 PERF=/tmp/identity.data .bench/venv/bin/python benches/e2e/profile_backlog.py
import os, sys, time, subprocess, uuid
from confluent_kafka import Producer, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
N = int(os.environ.get("N", "200000"))
BIN = os.environ.get("BIN", "/work/main/target/release/inferflow")
PERF = os.environ.get("PERF", "")
tag = uuid.uuid4().hex[:8]
req, res, dlq = f"q.req.{tag}", f"q.res.{tag}", f"q.dlq.{tag}"
a = AdminClient({"bootstrap.servers": "127.0.0.1:9092"})
for f in a.create_topics([NewTopic(t, 6, 1) for t in (req, res, dlq)]).values(): f.result()
p = Producer({"bootstrap.servers": "127.0.0.1:9092", "linger.ms": 20, "queue.buffering.max.messages": 1000000})
pad = "x" * 180
for i in range(N):
    v = '{"request_id":"tp-%d","pipeline":"identity","data":{"seq":%d,"pad":"%s"}}' % (i, i, pad)
    while True:
        try:
            p.produce(req, v.encode(), key=f"tp-{i}".encode()); break
        except BufferError:
            p.poll(0.01)
p.flush()
env = dict(os.environ)
env.update({"INFERFLOW__KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9092", "INFERFLOW__KAFKA__GROUP_ID": f"g-{tag}",
 "INFERFLOW__TOPICS__REQUESTS": req, "INFERFLOW__TOPICS__RESULTS": res, "INFERFLOW__TOPICS__DLQ": dlq,
 "INFERFLOW__TOPICS__FEATURES": req + ".unused", "INFERFLOW__TOPICS__CREATE_MISSING": "false",
 "INFERFLOW__INGEST__ENABLED": "false", "INFERFLOW__HTTP__LISTEN": "127.0.0.1:0", "INFERFLOW__LOG__LEVEL": "warn"})
c = Consumer({"bootstrap.servers": "127.0.0.1:9092", "group.id": f"c-{tag}", "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
c.subscribe([res])
proc = subprocess.Popen([BIN, "run"], env=env, stderr=open(f"/tmp/pf/{tag}.log", "w"))
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
seen = 0; t10 = None; c10 = None; perfp = None
while seen < N:
    msgs = c.consume(10000, 1.0)
    seen += sum(1 for m in msgs if m.error() is None)
    if t10 is None and seen >= N // 10:
        t10 = time.time(); c10 = cpu(proc.pid)
        if PERF:
            perfp = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(proc.pid), "-o", PERF, "--", "sleep", "5"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
t1 = time.time(); c1 = cpu(proc.pid)
proc.terminate(); proc.wait()
if perfp: perfp.wait()
n = N - N // 10
print(f"rate {n/(t1-t10):.0f}/s  cpu {1000*(c1-c10)/n:.4f} s/1k  ({(c1-c10)/n*1e6:.2f} us/req)")
