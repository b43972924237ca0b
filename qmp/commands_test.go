package qmp_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/qmp"
	"github.com/vmpod/vmpod/qmp/qmptest"
)

// TestCommandArguments checks the JSON each typed method sends against what QEMU
// 7.2's QAPI schema expects.
func TestCommandArguments(t *testing.T) {
	two := 2
	zero := 0
	tests := []struct {
		name    string
		call    func(context.Context, *qmp.Monitor) error
		command string
		args    string
		reply   any
	}{
		{"blockdev-add raw file", func(ctx context.Context, m *qmp.Monitor) error {
			return m.BlockdevAdd(ctx, qmp.BlockdevOptions{NodeName: "disk1-drive", Filename: "/img/a b,c.raw", ReadOnly: true})
		}, "blockdev-add", `{"driver":"raw","node-name":"disk1-drive","read-only":true,"file":{"driver":"file","filename":"/img/a b,c.raw"}}`, struct{}{}},
		{"blockdev-add qcow2 on a block device", func(ctx context.Context, m *qmp.Monitor) error {
			return m.BlockdevAdd(ctx, qmp.BlockdevOptions{NodeName: "d", Format: "qcow2", Protocol: "host_device", Filename: "/dev/sdb", Direct: true, Discard: true})
		}, "blockdev-add", `{"driver":"qcow2","node-name":"d","cache":{"direct":true},"discard":"unmap","file":{"driver":"host_device","filename":"/dev/sdb"}}`, struct{}{}},
		{"blockdev-del", func(ctx context.Context, m *qmp.Monitor) error { return m.BlockdevDel(ctx, "disk1-drive") },
			"blockdev-del", `{"node-name":"disk1-drive"}`, struct{}{}},
		{"device_add", func(ctx context.Context, m *qmp.Monitor) error {
			return m.DeviceAdd(ctx, qmp.DeviceOptions{Driver: "virtio-blk-pci", ID: "disk1", Bus: "rp0", Props: []qmp.Prop{
				qmp.StringProp("drive", "disk1-drive"), qmp.IntProp("bootindex", 1), qmp.BoolProp("share-rw", false)}})
		}, "device_add", `{"bootindex":1,"bus":"rp0","driver":"virtio-blk-pci","drive":"disk1-drive","id":"disk1","share-rw":false}`, struct{}{}},
		{"netdev_add tap fd", func(ctx context.Context, m *qmp.Monitor) error {
			return m.NetdevAddTap(ctx, qmp.TapNetdev{ID: "net1-tap", FDs: []string{"net1-fd0"}})
		}, "netdev_add", `{"type":"tap","id":"net1-tap","fd":"net1-fd0","vhost":false}`, struct{}{}},
		{"netdev_add tap multiqueue fds", func(ctx context.Context, m *qmp.Monitor) error {
			return m.NetdevAddTap(ctx, qmp.TapNetdev{ID: "n", FDs: []string{"a", "b"}, Vhost: true})
		}, "netdev_add", `{"type":"tap","id":"n","fds":"a:b","vhost":true}`, struct{}{}},
		{"netdev_add tap ifname", func(ctx context.Context, m *qmp.Monitor) error {
			return m.NetdevAddTap(ctx, qmp.TapNetdev{ID: "n", Ifname: "tap0", Queues: 2})
		}, "netdev_add", `{"type":"tap","id":"n","ifname":"tap0","script":"no","downscript":"no","queues":2,"vhost":false}`, struct{}{}},
		{"netdev_del", func(ctx context.Context, m *qmp.Monitor) error { return m.NetdevDel(ctx, "n") },
			"netdev_del", `{"id":"n"}`, struct{}{}},
		{"chardev-add on a passed connection", func(ctx context.Context, m *qmp.Monitor) error {
			return m.ChardevAddSocketFD(ctx, "share-sock", "virtiofsd")
		}, "chardev-add", `{"id":"share-sock","backend":{"type":"socket","data":{"addr":{"type":"fd","data":{"str":"virtiofsd"}},"server":false}}}`, struct{}{}},
		{"chardev-remove", func(ctx context.Context, m *qmp.Monitor) error { return m.ChardevRemove(ctx, "share-sock") },
			"chardev-remove", `{"id":"share-sock"}`, struct{}{}},
		{"add cpu", func(ctx context.Context, m *qmp.Monitor) error {
			return m.AddCPU(ctx, "cpu1", qmp.HotpluggableCPU{Type: "qemu64-x86_64-cpu", VCPUsCount: 1,
				Props: qmp.CPUProps{SocketID: &two, CoreID: &zero, ThreadID: &zero}})
		}, "device_add", `{"core-id":0,"driver":"qemu64-x86_64-cpu","id":"cpu1","socket-id":2,"thread-id":0}`, struct{}{}},
		{"object-add memfd", func(ctx context.Context, m *qmp.Monitor) error {
			return m.ObjectAddMemoryBackend(ctx, qmp.MemoryBackend{ID: "vmem1-mem", Size: 1 << 30, Shared: true})
		}, "object-add", `{"qom-type":"memory-backend-memfd","id":"vmem1-mem","size":1073741824,"share":true}`, struct{}{}},
		{"qom-set", func(ctx context.Context, m *qmp.Monitor) error {
			return qmp.QOMSet(ctx, m, qmp.PeripheralPath("vmem0"), "requested-size", uint64(0))
		}, "qom-set", `{"path":"/machine/peripheral/vmem0","property":"requested-size","value":0}`, struct{}{}},
		{"migrate-set-capabilities", func(ctx context.Context, m *qmp.Monitor) error {
			return m.MigrateSetCapabilities(ctx, qmp.MigrationCapabilityState{Capability: qmp.MigrationCapEvents, State: true})
		}, "migrate-set-capabilities", `{"capabilities":[{"capability":"events","state":true}]}`, struct{}{}},
		{"migrate-set-parameters", func(ctx context.Context, m *qmp.Monitor) error {
			return m.MigrateSetParameters(ctx, qmp.MigrationParameters{MaxBandwidth: 10e9, DowntimeLimit: 30 * time.Millisecond})
		}, "migrate-set-parameters", `{"max-bandwidth":10000000000,"downtime-limit":30}`, struct{}{}},
		{"add_client", func(ctx context.Context, m *qmp.Monitor) error { return m.AddClient(ctx, "vnc", "vnc-1", true) },
			"add_client", `{"protocol":"vnc","fdname":"vnc-1","skipauth":true}`, struct{}{}},
		{"migrate-continue", func(ctx context.Context, m *qmp.Monitor) error {
			return m.MigrateContinue(ctx, qmp.MigrationPreSwitchover)
		}, "migrate-continue", `{"state":"pre-switchover"}`, struct{}{}},
		{"migrate", func(ctx context.Context, m *qmp.Monitor) error { return m.Migrate(ctx, "unix:/run/m.sock") },
			"migrate", `{"uri":"unix:/run/m.sock"}`, struct{}{}},
		{"migrate-incoming", func(ctx context.Context, m *qmp.Monitor) error { return m.MigrateIncoming(ctx, "unix:/run/m.sock") },
			"migrate-incoming", `{"uri":"unix:/run/m.sock"}`, struct{}{}},
	}
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			errc := async(func() error { return tt.call(ctxTimeout(t, 5*time.Second), m) })
			c := srv.Expect(tt.command)
			srv.Reply(c, tt.reply)
			if err := waitErr(t, errc); err != nil {
				t.Fatal(err)
			}
			if got := compactJSON(t, c.Arguments); got != compactJSON(t, []byte(tt.args)) {
				t.Errorf("arguments\n got %s\nwant %s", got, tt.args)
			}
		})
	}
}

// compactJSON normalises key order (through a map) for comparison.
func compactJSON(t *testing.T, b []byte) string {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	out, _ := json.Marshal(v)
	return string(out)
}

func TestInvalidArgumentsAreNotSent(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	ctx := ctxTimeout(t, 5*time.Second)
	if err := m.NetdevAddTap(ctx, qmp.TapNetdev{ID: "n"}); err == nil {
		t.Error("tap without fd or ifname accepted")
	}
	if err := m.DeviceAdd(ctx, qmp.DeviceOptions{Driver: "d", ID: "x", Props: []qmp.Prop{qmp.StringProp("id", "y")}}); err == nil {
		t.Error("device property duplicating id accepted")
	}
	if err := m.MigrateSetParameters(ctx, qmp.MigrationParameters{DowntimeLimit: time.Microsecond}); err == nil {
		t.Error("sub-millisecond downtime limit accepted")
	}
	if err := m.AddCPU(ctx, "cpu0", qmp.HotpluggableCPU{Type: "x", QOMPath: "/machine/unattached/device[0]"}); err == nil {
		t.Error("AddCPU into an occupied slot accepted")
	}
	srv.NoCommand(50 * time.Millisecond)
}

func TestGetFDPassesTheDescriptor(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	errc := async(func() error {
		err := m.GetFD(ctxTimeout(t, 5*time.Second), "tapfd0", w)
		w.Close() // the caller may close its copy at once
		return err
	})
	c := srv.Expect("getfd")
	if string(c.Arguments) != `{"fdname":"tapfd0"}` || len(c.Files) != 1 {
		t.Fatalf("getfd arguments %s with %d files, want fdname tapfd0 and 1 file", c.Arguments, len(c.Files))
	}
	srv.Reply(c, struct{}{})
	if err := waitErr(t, errc); err != nil {
		t.Fatal(err)
	}
	// The received descriptor is the pipe's write end.
	if _, err := c.Files[0].Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	c.Files[0].Close()
	got, _ := io.ReadAll(r)
	if string(got) != "hi" {
		t.Errorf("read %q through the passed descriptor, want %q", got, "hi")
	}
}

func TestGetFDNeedsOOBCapability(t *testing.T) {
	srv := qmptest.NewServer(t, qmptest.WithCapabilities())
	m := dial(t, srv)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := m.GetFD(ctxTimeout(t, 5*time.Second), "x", f); err == nil {
		t.Fatal("GetFD without the oob capability succeeded")
	}
	srv.NoCommand(50 * time.Millisecond)
}

func TestQueryReplies(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	ctx := ctxTimeout(t, 5*time.Second)

	type pciResult struct {
		buses []qmp.PCIBus
		err   error
	}
	pc := make(chan pciResult, 1)
	go func() { b, err := m.QueryPCI(ctx); pc <- pciResult{b, err} }()
	srv.Reply(srv.Expect("query-pci"), json.RawMessage(`[{"bus":0,"devices":[
		{"bus":0,"slot":0,"function":0,"qdev_id":"","class_info":{"class":1536,"desc":"Host bridge"},"id":{"vendor":32902,"device":10688}},
		{"bus":0,"slot":16,"function":0,"qdev_id":"rp0","class_info":{"class":1540},"id":{"vendor":6966,"device":12},
		 "pci_bridge":{"bus":{"number":1,"secondary":1,"subordinate":1},"devices":[
		   {"bus":1,"slot":0,"function":0,"qdev_id":"disk1","class_info":{"class":256},"id":{"vendor":6900,"device":4162}}]}}]}]`))
	res := <-pc
	if res.err != nil {
		t.Fatal(res.err)
	}
	var ids []string
	for _, d := range qmp.FlattenPCI(res.buses) {
		ids = append(ids, d.QDevID)
	}
	if len(ids) != 3 || ids[1] != "rp0" || ids[2] != "disk1" {
		t.Errorf("flattened qdev ids %q, want [\"\" rp0 disk1]", ids)
	}

	type migResult struct {
		info qmp.MigrationInfo
		err  error
	}
	mc := make(chan migResult, 1)
	go func() { i, err := m.QueryMigrate(ctx); mc <- migResult{i, err} }()
	srv.Reply(srv.Expect("query-migrate"), struct{}{}) // no migration yet: QEMU answers {}
	if r := <-mc; r.err != nil || r.info.Status != qmp.MigrationNone {
		t.Errorf("QueryMigrate before any migration = %+v (err %v), want status none", r.info, r.err)
	}
	go func() { i, err := m.QueryMigrate(ctx); mc <- migResult{i, err} }()
	srv.Reply(srv.Expect("query-migrate"), map[string]any{"status": "completed", "total-time": 305, "downtime": 3,
		"ram": map[string]any{"transferred": 44e6, "remaining": 0, "total": 268435456, "duplicate": 10, "dirty-sync-count": 3, "dirty-pages-rate": 120, "mbps": 1200.5}})
	if r := <-mc; r.err != nil || r.info.Downtime != 3*time.Millisecond || r.info.RAM == nil || r.info.RAM.Transferred != 44e6 {
		t.Errorf("QueryMigrate = %+v (err %v)", r.info, r.err)
	}

	type vcpuResult struct {
		cpus []qmp.VCPU
		err  error
	}
	vc := make(chan vcpuResult, 1)
	go func() { c, err := m.QueryVCPUs(ctx); vc <- vcpuResult{c, err} }()
	srv.Reply(srv.Expect("query-cpus-fast"), json.RawMessage(`[{"cpu-index":0,"thread-id":4711,"qom-path":"/machine/unattached/device[0]","target":"x86_64","props":{"socket-id":0}},
		{"cpu-index":1,"thread-id":4712,"qom-path":"/machine/peripheral/cpu1","target":"x86_64"}]`))
	if r := <-vc; r.err != nil || len(r.cpus) != 2 || r.cpus[1].ThreadID != 4712 || r.cpus[1].Index != 1 {
		t.Errorf("QueryVCPUs = %+v (err %v)", r.cpus, r.err)
	}
	go func() { c, err := m.QueryVCPUs(ctx); vc <- vcpuResult{c, err} }()
	srv.Reply(srv.Expect("query-cpus-fast"), json.RawMessage(`[{"cpu-index":0,"qom-path":"/machine/unattached/device[0]"}]`))
	if r := <-vc; r.err == nil || !strings.Contains(r.err.Error(), "thread-id") {
		t.Errorf("QueryVCPUs of a reply without thread ids: %v, want an error naming thread-id", r.err)
	}

	type getResult struct {
		v   uint64
		err error
	}
	gc := make(chan getResult, 1)
	go func() {
		v, err := qmp.QOMGet[uint64](ctx, m, "/machine/peripheral/vmem0", "size")
		gc <- getResult{v, err}
	}()
	srv.Reply(srv.Expect("qom-get"), 268435456)
	if r := <-gc; r.err != nil || r.v != 256<<20 {
		t.Errorf("QOMGet = %d (err %v)", r.v, r.err)
	}
}

func TestCPUPropsCompareIsTopologyOrder(t *testing.T) {
	n := func(v int) *int { return &v }
	// query-hotpluggable-cpus order on q35: highest slot first
	slots := []qmp.CPUProps{
		{SocketID: n(1), CoreID: n(1), ThreadID: n(0)},
		{SocketID: n(1), CoreID: n(0), ThreadID: n(0)},
		{SocketID: n(0), CoreID: n(1), ThreadID: n(0)},
		{SocketID: n(0), CoreID: n(0), ThreadID: n(0)},
		{CoreID: n(0)}, // no socket: before every socket
	}
	slices.SortFunc(slots, qmp.CPUProps.Compare)
	var got []string
	for _, s := range slots {
		sock := -1
		if s.SocketID != nil {
			sock = *s.SocketID
		}
		got = append(got, fmt.Sprintf("%d/%d", sock, *s.CoreID))
	}
	if want := "-1/0 0/0 0/1 1/0 1/1"; strings.Join(got, " ") != want {
		t.Fatalf("sorted slots %v, want %s", got, want)
	}
}

// add-fd passes the descriptor and names the set QEMU made; a reply without the set or
// with a negative one is refused, and remove-fd names the set.
func TestAddFDAndRemoveFDSet(t *testing.T) {
	srv := qmptest.NewServer(t)
	m := dial(t, srv)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, tc := range []struct {
		reply string
		want  qmp.AddedFD
		err   string
	}{
		{`{"fdset-id": 3, "fd": 25}`, qmp.AddedFD{FDSetID: 3, FD: 25}, ""},
		{`{"fd": 25}`, qmp.AddedFD{}, `"return.fdset-id"`},
		{`{"fdset-id": -1, "fd": 25}`, qmp.AddedFD{}, "negative"},
	} {
		var got qmp.AddedFD
		errc := async(func() (err error) {
			got, err = m.AddFD(ctxTimeout(t, 5*time.Second), f, 3, "disk1")
			return err
		})
		c := srv.Expect("add-fd")
		if string(c.Arguments) != `{"fdset-id":3,"opaque":"disk1"}` || len(c.Files) != 1 {
			t.Fatalf("add-fd arguments %s with %d files, want fd set 3, opaque disk1 and 1 file", c.Arguments, len(c.Files))
		}
		c.Files[0].Close()
		srv.Reply(c, json.RawMessage(tc.reply))
		err := waitErr(t, errc)
		switch {
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("reply %s: %+v, %v; want %+v", tc.reply, got, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("reply %s: %v, want an error with %s", tc.reply, err, tc.err)
		}
	}
	errc := async(func() error { return m.RemoveFDSet(ctxTimeout(t, 5*time.Second), 3) })
	c := srv.Expect("remove-fd")
	if string(c.Arguments) != `{"fdset-id":3}` {
		t.Errorf("remove-fd arguments %s", c.Arguments)
	}
	srv.Reply(c, struct{}{})
	if err := waitErr(t, errc); err != nil {
		t.Fatal(err)
	}
}

// A vCPU's device id names its slot: unique among the slots, whichever props the machine
// sets.
func TestCPUPropsName(t *testing.T) {
	n := func(v int) *int { return &v }
	for props, want := range map[qmp.CPUProps]string{
		{SocketID: n(0), CoreID: n(1), ThreadID: n(0)}:            "cpu-s0-c1-t0",
		{NodeID: n(1), SocketID: n(2), DieID: n(0), CoreID: n(3)}: "cpu-n1-s2-d0-c3",
		{}: "cpu",
	} {
		if got := props.Name(); got != want {
			t.Errorf("%+v.Name() = %q, want %q", props, got, want)
		}
	}
}
