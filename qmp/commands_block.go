package qmp

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
)

// BlockdevOptions describe a disk image for blockdev-add: a format node over a
// protocol node, created together under one node name. blockdev-del of NodeName
// removes both.
type BlockdevOptions struct {
	NodeName string // at most 31 characters (QEMU's limit)
	Format   string // format driver: "raw" or "qcow2"; "" means "raw"
	Protocol string // protocol driver: "file" or "host_device"; "" means "file"
	Filename string
	ReadOnly bool
	Direct   bool   // bypass the host page cache (cache.direct=on, O_DIRECT)
	Discard  bool   // pass the guest's discards down to the image (discard=unmap)
	Backing  string // node name of the base under a qcow2 overlay
}

// MarshalJSON renders the QAPI BlockdevOptions union.
func (o BlockdevOptions) MarshalJSON() ([]byte, error) {
	type cache struct {
		Direct bool `json:"direct"`
	}
	type file struct {
		Driver   string `json:"driver"`
		Filename string `json:"filename"`
	}
	args := struct {
		Driver   string `json:"driver"`
		NodeName string `json:"node-name"`
		ReadOnly bool   `json:"read-only,omitempty"`
		Cache    *cache `json:"cache,omitempty"`
		Discard  string `json:"discard,omitempty"`
		Backing  string `json:"backing,omitempty"`
		File     file   `json:"file"`
	}{
		Driver:   orDefault(o.Format, "raw"),
		NodeName: o.NodeName,
		ReadOnly: o.ReadOnly,
		Backing:  o.Backing,
		File:     file{Driver: orDefault(o.Protocol, "file"), Filename: o.Filename},
	}
	if o.Direct {
		args.Cache = &cache{Direct: true}
	}
	if o.Discard {
		args.Discard = "unmap"
	}
	return json.Marshal(args)
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// BlockdevAdd opens a disk image as a block node (blockdev-add).
func (m *Monitor) BlockdevAdd(ctx context.Context, o BlockdevOptions) error {
	return m.run(ctx, "blockdev-add", o.NodeName, o, nil)
}

// BlockdevDel closes a block node that no device uses any more (blockdev-del).
func (m *Monitor) BlockdevDel(ctx context.Context, nodeName string) error {
	return m.run(ctx, "blockdev-del", nodeName, struct {
		NodeName string `json:"node-name"`
	}{nodeName}, nil)
}

// BlockInfo is one entry of query-block: a block backend, usually a device's.
type BlockInfo struct {
	Device   string         `json:"device"`         // backend name; empty for -blockdev/blockdev-add disks
	QDev     string         `json:"qdev,omitempty"` // QOM path of the device using it
	Inserted *BlockNodeInfo `json:"inserted,omitempty"`
}

// BlockNodeInfo describes the node inserted in a block backend.
type BlockNodeInfo struct {
	NodeName string `json:"node-name"`
	File     string `json:"file"`
	Driver   string `json:"drv"`
	ReadOnly bool   `json:"ro"`
}

// QueryBlock lists the block backends (query-block).
func (m *Monitor) QueryBlock(ctx context.Context) ([]BlockInfo, error) {
	var bs []BlockInfo
	err := m.run(ctx, "query-block", "", nil, &bs)
	return bs, err
}

// AddedFD is where add-fd put a descriptor: a device opens the set as /dev/fdset/<FDSetID>.
type AddedFD struct {
	FDSetID int `json:"fdset-id"`
	FD      int `json:"fd"`
}

func (a *AddedFD) validate() *ReplyError {
	if a.FDSetID < 0 || a.FD < 0 {
		return &ReplyError{Problem: fmt.Sprintf("fdset-id %d, fd %d: negative", a.FDSetID, a.FD)}
	}
	return nil
}

// AddFD passes file to QEMU (SCM_RIGHTS) into fd set fdSet (add-fd), which a block node
// then opens as /dev/fdset/<fdSet>: QEMU gets the image the caller opened, never a path.
// The caller names the set, so that it can remove it even when no reply came. opaque is
// a note QEMU keeps with the descriptor (query-fdsets). The caller may close file once
// AddFD returns; QEMU holds its copy until RemoveFDSet.
func (m *Monitor) AddFD(ctx context.Context, file *os.File, fdSet int, opaque string) (AddedFD, error) {
	var added AddedFD
	if file == nil {
		return added, fmt.Errorf("qmp: add-fd %s: no file", opaque)
	}
	ret, err := m.call(ctx, "add-fd", struct {
		FDSetID int    `json:"fdset-id"`
		Opaque  string `json:"opaque,omitempty"`
	}{fdSet, opaque}, file)
	if err == nil {
		err = decodeStrict("add-fd reply", "return", ret, &added)
	}
	if err != nil {
		return added, commandFailed("add-fd", opaque, err)
	}
	return added, nil
}

// RemoveFDSet closes every descriptor of fd set id (remove-fd); a block node still
// using one keeps it until the node is deleted.
func (m *Monitor) RemoveFDSet(ctx context.Context, id int) error {
	return m.run(ctx, "remove-fd", strconv.Itoa(id), struct {
		FDSetID int `json:"fdset-id"`
	}{id}, nil)
}
