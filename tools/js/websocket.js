// MQTT.js (the npm package `mqtt`) over WebSocket against a shardmq broker:
// `node websocket.js URL` (ws://127.0.0.1:PORT/mqtt). A subscriber and a publisher, MQTT 5.0
// and 3.1.1; the subscriber must receive the QoS 1 message. Exits non-zero on failure; bounded
// by a timer.
const mqtt = require("mqtt");

const url = process.argv[2];
const timer = setTimeout(() => {
  console.error("MQTT.js: timed out");
  process.exit(1);
}, 15000);

let passed = false;
const sub = mqtt.connect(url, { clientId: "js-sub", protocolVersion: 5 });
sub.on("error", (error) => {
  // After DISCONNECT the broker closes the socket; the client's late WebSocket close frame
  // may then fail to write (EPIPE), which is not a failure of the test.
  if (passed) return;
  console.error("subscriber:", error.message);
  process.exit(1);
});
sub.on("connect", () => {
  sub.subscribe("js/test", { qos: 1 }, (error) => {
    if (error) {
      console.error("subscribe:", error.message);
      process.exit(1);
    }
    const pub = mqtt.connect(url, { clientId: "js-pub", protocolVersion: 4 });
    let pubEnding = false;
    pub.on("error", (e) => {
      if (passed || pubEnding) return;
      console.error("publisher:", e.message);
      process.exit(1);
    });
    pub.on("connect", () => {
      pub.publish("js/test", "hello from MQTT.js", { qos: 1 }, (e) => {
        if (e) {
          console.error("publish:", e.message);
          process.exit(1);
        }
        pubEnding = true;
        pub.end();
      });
    });
  });
});
sub.on("message", (topic, payload) => {
  if (topic !== "js/test" || payload.toString() !== "hello from MQTT.js") {
    console.error("unexpected message", topic, payload.toString());
    process.exit(1);
  }
  passed = true;
  console.log("mqtt.js websocket passed");
  clearTimeout(timer);
  sub.end(() => process.exit(0));
});
