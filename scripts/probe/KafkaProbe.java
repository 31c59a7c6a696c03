// Readiness probe for the local Kafka broker started by scripts/stack.
//
// scripts/stack compiles this once into .stack/probes/kafka and runs the class. By hand,
// with the Java single-file source launcher and Kafka's own client jars on the classpath:
//   java -cp ".stack/lib/kafka/*" scripts/probe/KafkaProbe.java 127.0.0.1:9092 <timeout_s> [client.properties]
//
// The optional properties file holds client settings layered over the defaults below, e.g.
// SASL_SSL with SCRAM for the secure broker (scripts/stack writes .stack/secure/probe.properties).
//
// Sends real requests through Kafka's AdminClient: DescribeCluster (must list at
// least one broker) and a Metadata request (listTopics). Retries until both succeed
// or the deadline passes. Exit 0 = ready (prints cluster id and broker count),
// 1 = not ready by the deadline, 2 = bad usage.

import java.io.FileInputStream;
import java.io.InputStream;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterOptions;
import org.apache.kafka.clients.admin.ListTopicsOptions;

public class KafkaProbe {
    public static void main(String[] args) throws Exception {
        if (args.length != 2 && args.length != 3) {
            System.err.println("usage: KafkaProbe <host:port> <timeout_s> [client.properties]");
            System.exit(2);
        }
        String bootstrap = args[0];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));

        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.CLIENT_ID_CONFIG, "inferflow-stack-probe");
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.RECONNECT_BACKOFF_MS_CONFIG, "100");
        props.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "500");
        props.put(AdminClientConfig.RETRY_BACKOFF_MS_CONFIG, "100");
        props.put(AdminClientConfig.RETRY_BACKOFF_MAX_MS_CONFIG, "500");
        if (args.length == 3) {
            try (InputStream in = new FileInputStream(args[2])) {
                props.load(in);
            }
        }

        String lastError = "no attempt made";
        try (Admin admin = Admin.create(props)) {
            while (true) {
                long leftMs = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime());
                if (leftMs <= 0) break;
                int attemptMs = (int) Math.max(1, Math.min(leftMs, 3000));
                try {
                    var cluster = admin.describeCluster(new DescribeClusterOptions().timeoutMs(attemptMs));
                    int brokers = cluster.nodes().get(attemptMs, TimeUnit.MILLISECONDS).size();
                    String clusterId = cluster.clusterId().get(attemptMs, TimeUnit.MILLISECONDS);
                    if (brokers < 1) throw new IllegalStateException("cluster reports no brokers");
                    int topics = admin.listTopics(new ListTopicsOptions().listInternal(true).timeoutMs(attemptMs))
                            .names().get(attemptMs, TimeUnit.MILLISECONDS).size();
                    System.out.println("kafka ready: cluster " + clusterId + ", " + brokers
                            + " broker(s), " + topics + " topic(s)");
                    System.exit(0);
                } catch (Exception e) {
                    Throwable cause = e.getCause() != null ? e.getCause() : e;
                    lastError = describe(cause);
                }
                Thread.sleep(Math.min(500, Math.max(0,
                        TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime()))));
            }
        }
        System.err.println("kafka not ready at " + bootstrap + ": " + lastError);
        System.exit(1);
    }

    private static String describe(Throwable t) {
        String msg = t.getMessage();
        return msg == null ? t.getClass().getSimpleName() : t.getClass().getSimpleName() + ": " + msg;
    }
}
