// Readiness probe for the local Cassandra node started by scripts/stack.
//
// scripts/stack compiles this once into .stack/probes/cassandra and runs the class. By hand,
// with the Java single-file source launcher and Cassandra's jars on the classpath (they
// include the shaded DataStax Java driver 3.x, a real CQL client):
//   java -cp ".stack/lib/cassandra/*" scripts/probe/CqlProbe.java 127.0.0.1:9042 <timeout_s>
//
// Connects over the CQL native protocol and runs
// `SELECT release_version FROM system.local`, retrying until it succeeds or the
// deadline passes. Exit 0 = ready (prints the release version), 1 = not ready by
// the deadline, 2 = bad usage.

import java.util.concurrent.TimeUnit;
import com.datastax.driver.core.Cluster;
import com.datastax.driver.core.Row;
import com.datastax.driver.core.Session;
import com.datastax.driver.core.SocketOptions;

public class CqlProbe {
    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: CqlProbe <host:port> <timeout_s>");
            System.exit(2);
        }
        int colon = args[0].lastIndexOf(':');
        String host = args[0].substring(0, colon);
        int port = Integer.parseInt(args[0].substring(colon + 1));
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));

        String lastError = "no attempt made";
        while (System.nanoTime() < deadline) {
            int leftMs = (int) Math.max(1, Math.min(5000,
                    TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime())));
            // A fresh Cluster per attempt: the driver gives up on a host that refused
            // the first connection, so reusing one would not notice the node coming up.
            try (Cluster cluster = Cluster.builder()
                    .addContactPoint(host)
                    .withPort(port)
                    .withoutJMXReporting()
                    .withoutMetrics()
                    .withSocketOptions(new SocketOptions()
                            .setConnectTimeoutMillis(leftMs)
                            .setReadTimeoutMillis(leftMs))
                    .build();
                 Session session = cluster.connect()) {
                Row row = session.execute("SELECT release_version FROM system.local").one();
                if (row == null) throw new IllegalStateException("system.local returned no row");
                System.out.println("cassandra ready: release_version " + row.getString("release_version"));
                System.exit(0);
            } catch (Exception e) {
                lastError = describe(e);
            }
            Thread.sleep(Math.min(500, Math.max(0,
                    TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime()))));
        }
        System.err.println("cassandra not ready at " + args[0] + ": " + lastError);
        System.exit(1);
    }

    private static String describe(Throwable t) {
        String msg = t.getMessage();
        return msg == null ? t.getClass().getSimpleName() : t.getClass().getSimpleName() + ": " + msg;
    }
}
