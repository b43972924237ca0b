package qga

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
)

// VCPU is one of the guest's logical CPUs (guest-get-vcpus).
type VCPU struct {
	LogicalID  int  `json:"logical-id"`
	Online     bool `json:"online"`
	CanOffline bool `json:"can-offline,omitempty"`
}

// VCPUs runs guest-get-vcpus: the CPUs the guest kernel knows, online or not.
func (c *Client) VCPUs(ctx context.Context) ([]VCPU, error) {
	const cmd = "guest-get-vcpus"
	var out []VCPU
	if err := c.call(ctx, cmd, nil, &out); err != nil {
		return nil, err
	}
	seen := map[int]bool{}
	for i, v := range out {
		if v.LogicalID < 0 || seen[v.LogicalID] {
			return nil, &ReplyError{Command: cmd, Field: fmt.Sprintf("[%d].logical-id", i), Problem: fmt.Sprintf("%d is negative or repeated", v.LogicalID)}
		}
		seen[v.LogicalID] = true
	}
	return out, nil
}

// OnlineVCPUs runs guest-set-vcpus to bring the CPUs ids online, and returns how many of
// them the guest did: the agent stops at the first it cannot change.
func (c *Client) OnlineVCPUs(ctx context.Context, ids []int) (int, error) {
	const cmd = "guest-set-vcpus"
	req := struct {
		VCPUs []VCPU `json:"vcpus"`
	}{}
	for _, id := range ids {
		req.VCPUs = append(req.VCPUs, VCPU{LogicalID: id, Online: true})
	}
	var n int
	if err := c.call(ctx, cmd, req, &n); err != nil {
		return 0, err
	}
	if n < 0 || n > len(ids) {
		return 0, &ReplyError{Command: cmd, Field: "return", Problem: fmt.Sprintf("%d vCPUs changed of %d asked", n, len(ids))}
	}
	return n, nil
}

// MemoryBlock is one of the guest kernel's memory blocks (guest-get-memory-blocks):
// the unit in which memory comes online and goes offline.
type MemoryBlock struct {
	PhysIndex  uint64 `json:"phys-index"`
	Online     bool   `json:"online"`
	CanOffline bool   `json:"can-offline,omitempty"`
}

// MemoryBlocks runs guest-get-memory-blocks.
func (c *Client) MemoryBlocks(ctx context.Context) ([]MemoryBlock, error) {
	var out []MemoryBlock
	err := c.call(ctx, "guest-get-memory-blocks", nil, &out)
	return out, err
}

// OnlineMemoryBlocks runs guest-set-memory-blocks to bring the blocks indexes online,
// and returns the indexes the guest could not bring online, each with the agent's reason.
func (c *Client) OnlineMemoryBlocks(ctx context.Context, indexes []uint64) (map[uint64]string, error) {
	const cmd = "guest-set-memory-blocks"
	req := struct {
		Blocks []MemoryBlock `json:"mem-blks"`
	}{}
	for _, i := range indexes {
		req.Blocks = append(req.Blocks, MemoryBlock{PhysIndex: i, Online: true})
	}
	var out []struct {
		PhysIndex uint64 `json:"phys-index"`
		Response  string `json:"response"` // success, not-found, operation-not-supported, operation-failed
		ErrorCode *int   `json:"error-code"`
	}
	if err := c.call(ctx, cmd, req, &out); err != nil {
		return nil, err
	}
	failed := map[uint64]string{}
	for i, r := range out {
		switch {
		case r.Response == "success":
		case r.Response == "":
			return nil, &ReplyError{Command: cmd, Field: fmt.Sprintf("[%d].response", i), Problem: "missing"}
		case r.ErrorCode != nil:
			failed[r.PhysIndex] = fmt.Sprintf("%s (errno %d)", r.Response, *r.ErrorCode)
		default:
			failed[r.PhysIndex] = r.Response
		}
	}
	return failed, nil
}

// PermanentBlockRefusal says whether a reason OnlineMemoryBlocks gave for a block is one
// asking again cannot change: the guest has no such block, or cannot online it at all
// (operation-failed, with its errno, may pass).
func PermanentBlockRefusal(why string) bool {
	return why == "not-found" || strings.HasPrefix(why, "operation-not-supported")
}

// OnlineMovable brings memory block index online in ZONE_MOVABLE, which only holds pages
// the kernel can move away: the block can then be emptied and unplugged again, where a
// block guest-set-memory-blocks onlines (the kernel's default zone, ZONE_NORMAL) keeps
// whatever unmovable allocation lands in it (measured: 4 of 512 MiB stayed, so a shrink
// never finished). There is no agent command for it: the block's sysfs state is written
// through guest-file-open/-write/-close, which an admin may have disabled (the error
// says so; the caller then falls back to OnlineMemoryBlocks).
func (c *Client) OnlineMovable(ctx context.Context, index uint64) error {
	path := fmt.Sprintf("/sys/devices/system/memory/memory%d/state", index)
	var handle int64
	if err := c.call(ctx, "guest-file-open", struct {
		Path string `json:"path"`
		Mode string `json:"mode"`
	}{path, "w"}, &handle); err != nil {
		return err
	}
	const state = "online_movable"
	var wrote struct {
		Count int `json:"count"`
	}
	werr := c.call(ctx, "guest-file-write", struct {
		Handle int64  `json:"handle"`
		Buf    string `json:"buf-b64"`
	}{handle, base64.StdEncoding.EncodeToString([]byte(state))}, &wrote)
	// the kernel acts on the write, but a sysfs store's error may only come at the close
	cerr := c.call(ctx, "guest-file-close", struct {
		Handle int64 `json:"handle"`
	}{handle}, nil)
	switch {
	case werr != nil:
		return werr
	case cerr != nil:
		return cerr
	case wrote.Count != len(state):
		return &ReplyError{Command: "guest-file-write", Field: "count", Problem: fmt.Sprintf("%d bytes of %d written to %s", wrote.Count, len(state), path)}
	}
	return nil
}
