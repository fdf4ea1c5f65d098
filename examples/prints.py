# print() output is captured (first 100 calls) and returned beside the result.
import json

print("hello from the sandbox", 42, None, {"nested": [1, 2]})
for index in range(3):
    print("item", index, _items[index]["json"]["name"])
return {"json": {"printed": True, "payload": json.dumps({"ok": True})}}
