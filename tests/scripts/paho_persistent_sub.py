"""paho-mqtt as a device with a persistent session: connects to HOST:PORT as ID (3.1.1 Clean
Session 0, or with v5 Clean Start 0 and a Session Expiry Interval of 300 s), subscribes TOPIC at
QoS 1 only when the broker has no session for it, and lets paho reconnect by itself when the
connection is lost. Prints one line per event: "connected SP" (SP: 1 if the session was
present), "subscribed", "msg PAYLOAD". Runs until killed, or 120 s at most.
Usage: paho_persistent_sub.py HOST PORT ID TOPIC [v5]"""
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, port, client_id, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
v5 = len(sys.argv) > 5 and sys.argv[5] == "v5"


def say(line):
    print(line, flush=True)


def on_connect(client, userdata, flags, reason_code, properties=None):
    present = bool(flags.session_present)
    say(f"connected {int(present)}")
    if not present:
        client.subscribe(topic, qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties=None):
    say("subscribed")


def on_message(client, userdata, msg):
    say(f"msg {msg.payload.decode()}")


if v5:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
else:
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=False,
    )
c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
c.reconnect_delay_set(min_delay=1, max_delay=2)
if v5:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    c.connect(host, port, keepalive=5, clean_start=False, properties=props)
else:
    c.connect(host, port, keepalive=5)
c.loop_start()
time.sleep(120)
