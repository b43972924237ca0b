package qga

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"
)

// The vCPU and memory-block commands carry what qemu-guest-agent's schema says, and a
// reply that does not add up is an error naming the field.
func TestVCPUsAndMemoryBlocks(t *testing.T) {
	asked := map[string]json.RawMessage{}
	f := &fakeAgent{t: t, reply: func(cmd string, args json.RawMessage) (any, string, bool) {
		asked[cmd] = args
		switch cmd {
		case "guest-get-vcpus":
			return []map[string]any{{"logical-id": 0, "online": true, "can-offline": false}, {"logical-id": 1, "online": false, "can-offline": true}}, "", false
		case "guest-set-vcpus":
			return 1, "", false
		case "guest-get-memory-blocks":
			return []map[string]any{{"phys-index": 8, "online": true, "can-offline": true}, {"phys-index": 40, "online": false, "can-offline": true}}, "", false
		case "guest-set-memory-blocks":
			return []map[string]any{{"phys-index": 40, "response": "success"}, {"phys-index": 41, "response": "operation-failed", "error-code": 16}}, "", false
		}
		return nil, "CommandNotFound", false
	}}
	c := New(f.dial)
	defer c.Close()
	vcpus, err := c.VCPUs(ctx(t))
	if err != nil || !reflect.DeepEqual(vcpus, []VCPU{{0, true, false}, {1, false, true}}) {
		t.Fatalf("VCPUs: %+v, %v", vcpus, err)
	}
	if n, err := c.OnlineVCPUs(ctx(t), []int{1}); n != 1 || err != nil {
		t.Errorf("OnlineVCPUs: %d, %v", n, err)
	}
	if got := string(asked["guest-set-vcpus"]); got != `{"vcpus":[{"logical-id":1,"online":true}]}` {
		t.Errorf("guest-set-vcpus arguments %s", got)
	}
	blocks, err := c.MemoryBlocks(ctx(t))
	if err != nil || !reflect.DeepEqual(blocks, []MemoryBlock{{8, true, true}, {40, false, true}}) {
		t.Fatalf("MemoryBlocks: %+v, %v", blocks, err)
	}
	failed, err := c.OnlineMemoryBlocks(ctx(t), []uint64{40, 41})
	if err != nil || !reflect.DeepEqual(failed, map[uint64]string{41: "operation-failed (errno 16)"}) {
		t.Errorf("OnlineMemoryBlocks: %v, %v", failed, err)
	}
	if got := string(asked["guest-set-memory-blocks"]); got != `{"mem-blks":[{"phys-index":40,"online":true},{"phys-index":41,"online":true}]}` {
		t.Errorf("guest-set-memory-blocks arguments %s", got)
	}
}

func TestVCPUBadReplies(t *testing.T) {
	for name, reply := range map[string]func(string) any{
		"repeated cpu": func(string) any {
			return []map[string]any{{"logical-id": 0, "online": true}, {"logical-id": 0, "online": true}}
		},
		"more than sent": func(string) any { return 3 },
	} {
		f := &fakeAgent{t: t, reply: func(cmd string, _ json.RawMessage) (any, string, bool) { return reply(cmd), "", false }}
		c := New(f.dial)
		_, err := c.VCPUs(ctx(t))
		if name == "more than sent" {
			_, err = c.OnlineVCPUs(ctx(t), []int{1})
		}
		var re *ReplyError
		if !errors.As(err, &re) {
			t.Errorf("%s: %v, want a ReplyError", name, err)
		}
		c.Close()
	}
}

// OnlineMovable writes online_movable to the block's sysfs state through the agent's file
// commands and closes the handle whatever happened; the kernel's refusal, which comes at
// the close (the write is buffered), is the error.
func TestOnlineMovable(t *testing.T) {
	for _, refuse := range []bool{false, true} {
		var calls []string
		var opened, wrote string
		f := &fakeAgent{t: t, reply: func(cmd string, args json.RawMessage) (any, string, bool) {
			if cmd != "guest-sync-delimited" {
				calls = append(calls, cmd)
			}
			switch cmd {
			case "guest-file-open":
				opened = string(args)
				return 7, "", false
			case "guest-file-write":
				wrote = string(args)
				return map[string]any{"count": 14, "eof": false}, "", false
			case "guest-file-close":
				if refuse {
					return nil, "GenericError", false
				}
				return map[string]any{}, "", false
			}
			return nil, "CommandNotFound", false
		}}
		c := New(f.dial)
		err := c.OnlineMovable(ctx(t), 40)
		c.Close()
		if opened != `{"path":"/sys/devices/system/memory/memory40/state","mode":"w"}` || wrote != `{"handle":7,"buf-b64":"b25saW5lX21vdmFibGU="}` {
			t.Errorf("open %s, write %s", opened, wrote)
		}
		if !reflect.DeepEqual(calls, []string{"guest-file-open", "guest-file-write", "guest-file-close"}) {
			t.Errorf("calls %v", calls)
		}
		var e *Error
		if refuse != (err != nil) || (refuse && !errors.As(err, &e)) {
			t.Errorf("refused at close %v: %v", refuse, err)
		}
	}
}
