"""paho-mqtt through the mqlb LB: a subscriber and a publisher (given client IDs, so the test
can put them on different brokers) exchange COUNT QoS 1 messages. Exit 0 when all arrived
exactly once, 1 otherwise. Usage: paho_roundtrip.py HOST PORT SUB_ID PUB_ID COUNT [v5]
With MQLB_CAFILE set, both connect over TLS and verify the server against that CA file."""
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port, sub_id, pub_id, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
proto = mqtt.MQTTv5 if len(sys.argv) > 6 and sys.argv[6] == "v5" else mqtt.MQTTv311
topic = "paho/roundtrip"
cafile = os.environ.get("MQLB_CAFILE")
got = []
subscribed = threading.Event()
done = threading.Event()


def on_connect(client, userdata, flags, reason_code, properties=None):
    client.subscribe(topic, qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties=None):
    subscribed.set()


def on_message(client, userdata, msg):
    got.append(msg.payload.decode())
    if len(got) >= count:
        done.set()


sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=sub_id, protocol=proto)
sub.on_connect = on_connect
sub.on_subscribe = on_subscribe
sub.on_message = on_message
if cafile:
    sub.tls_set(ca_certs=cafile)
sub.connect(host, port)
sub.loop_start()
if not subscribed.wait(10):
    print("subscriber never subscribed")
    sys.exit(1)

pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=pub_id, protocol=proto)
if cafile:
    pub.tls_set(ca_certs=cafile)
pub.connect(host, port)
pub.loop_start()
for i in range(count):
    pub.publish(topic, str(i), qos=1).wait_for_publish(10)
done.wait(15)
time.sleep(0.3)  # anything extra (a duplicate) would arrive now
pub.loop_stop()
sub.loop_stop()
ok = sorted(got, key=int) == [str(i) for i in range(count)]
print(f"received {len(got)} of {count}: {'ok' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
