package meshtest

import (
	"context"
	_ "embed"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/bufbuild/protocompile"
	_ "google.golang.org/genproto/googleapis/api/annotations" // google/api/annotations.proto for the compiler
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// GRPC is a sidecar whose application is the Echo gRPC service (testdata/echo.proto), served
// over HTTP/2 behind the sidecar's mTLS.
const GRPC = "grpc"

// EchoService is the full name of the test gRPC service.
const EchoService = "meshtest.echo.v1.Echo"

// Response metadata the Echo service sends on every call: a header and a trailer.
const (
	EchoHeader  = "x-echo-served-by"
	EchoTrailer = "x-echo-trailer"
	// EchoMetadataHeader names (comma-separated) request metadata keys Echo reports back in
	// Item.metadata.
	EchoMetadataHeader = "x-echo-metadata"
)

//go:embed testdata/echo.proto
var echoProto string

var echoOnce struct {
	sync.Once
	fd  protoreflect.FileDescriptor
	set []byte
	err error
}

// EchoProto is the source of the test service, as embedded.
func EchoProto() string { return echoProto }

// echoFile compiles testdata/echo.proto once.
func echoFile() (protoreflect.FileDescriptor, []byte, error) {
	echoOnce.Do(func() {
		echoOnce.fd, echoOnce.set, echoOnce.err = CompileProto("echo.proto", map[string]string{"echo.proto": echoProto})
	})
	return echoOnce.fd, echoOnce.set, echoOnce.err
}

// CompileProto compiles the .proto file name from sources (path -> content), as protoc would;
// imports not in sources (google/api, google/protobuf) come from the Go packages linked in. It
// returns the file and its descriptor set with every import, dependencies first, as protoc
// --include_imports --descriptor_set_out writes it.
func CompileProto(name string, sources map[string]string) (protoreflect.FileDescriptor, []byte, error) {
	c := protocompile.Compiler{Resolver: protocompile.CompositeResolver{
		&protocompile.SourceResolver{Accessor: protocompile.SourceAccessorFromMap(sources)},
		protocompile.ResolverFunc(func(path string) (protocompile.SearchResult, error) {
			fd, err := protoregistry.GlobalFiles.FindFileByPath(path)
			if err != nil {
				return protocompile.SearchResult{}, err
			}
			return protocompile.SearchResult{Desc: fd}, nil
		}),
	}}
	files, err := c.Compile(context.Background(), name)
	if err != nil {
		return nil, nil, fmt.Errorf("compile %s: %w", name, err)
	}
	var fds descriptorpb.FileDescriptorSet
	seen := map[string]bool{}
	var add func(protoreflect.FileDescriptor)
	add = func(fd protoreflect.FileDescriptor) {
		if seen[fd.Path()] {
			return
		}
		seen[fd.Path()] = true
		for i := 0; i < fd.Imports().Len(); i++ {
			add(fd.Imports().Get(i).FileDescriptor)
		}
		fds.File = append(fds.File, protodesc.ToFileDescriptorProto(fd))
	}
	add(files[0])
	set, err := proto.MarshalOptions{Deterministic: true}.Marshal(&fds)
	return files[0], set, err
}

// EchoDescriptorSet is the test service's descriptor set, as protoc --include_imports
// --descriptor_set_out would write it.
func EchoDescriptorSet() ([]byte, error) {
	_, set, err := echoFile()
	return set, err
}

// EchoServer is the Echo gRPC service. It reports what it saw in every Item: the caller (the
// last x-forwarded-client-cert URI), the method, and the metadata asked for.
type EchoServer struct {
	*grpc.Server
	served atomic.Int64
}

// Served is how many calls the service answered.
func (s *EchoServer) Served() int64 { return s.served.Load() }

// NewEchoServer builds the service (not yet serving).
func NewEchoServer() (*EchoServer, error) {
	fd, _, err := echoFile()
	if err != nil {
		return nil, err
	}
	sd := fd.Services().ByName("Echo")
	s := &EchoServer{Server: grpc.NewServer(grpc.MaxRecvMsgSize(16 << 20))}
	desc := grpc.ServiceDesc{ServiceName: EchoService, HandlerType: (*any)(nil)}
	for i := 0; i < sd.Methods().Len(); i++ {
		md := sd.Methods().Get(i)
		if md.IsStreamingServer() {
			desc.Streams = append(desc.Streams, grpc.StreamDesc{
				StreamName:    string(md.Name()),
				ServerStreams: true,
				Handler: func(_ any, stream grpc.ServerStream) error {
					in := dynamicpb.NewMessage(md.Input())
					if err := stream.RecvMsg(in); err != nil {
						return err
					}
					s.served.Add(1)
					return s.list(stream, md, in)
				},
			})
			continue
		}
		desc.Methods = append(desc.Methods, grpc.MethodDesc{
			MethodName: string(md.Name()),
			Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
				in := dynamicpb.NewMessage(md.Input())
				if err := dec(in); err != nil {
					return nil, err
				}
				s.served.Add(1)
				return s.unary(ctx, md, in)
			},
		})
	}
	s.RegisterService(&desc, nil)
	return s, nil
}

func field(m protoreflect.Message, name string) protoreflect.Value {
	return m.Get(m.Descriptor().Fields().ByName(protoreflect.Name(name)))
}

func setField(m protoreflect.Message, name string, v protoreflect.Value) {
	m.Set(m.Descriptor().Fields().ByName(protoreflect.Name(name)), v)
}

// report fills the Item's caller, method and metadata from the call's context.
func (s *EchoServer) report(ctx context.Context, md protoreflect.MethodDescriptor, item protoreflect.Message) {
	in, _ := metadata.FromIncomingContext(ctx)
	setField(item, "caller", protoreflect.ValueOfString(lastXFCCURI(in.Get("x-forwarded-client-cert"))))
	setField(item, "method", protoreflect.ValueOfString("/"+string(md.Parent().FullName())+"/"+string(md.Name())))
	mm := item.Mutable(item.Descriptor().Fields().ByName("metadata")).Map()
	for _, names := range in.Get(EchoMetadataHeader) {
		for _, k := range strings.Split(names, ",") {
			k = strings.ToLower(strings.TrimSpace(k))
			if v := in.Get(k); len(v) > 0 {
				mm.Set(protoreflect.ValueOfString(k).MapKey(), protoreflect.ValueOfString(strings.Join(v, ",")))
			}
		}
	}
}

func (s *EchoServer) unary(ctx context.Context, md protoreflect.MethodDescriptor, in *dynamicpb.Message) (proto.Message, error) {
	_ = grpc.SetHeader(ctx, metadata.Pairs(EchoHeader, "echo"))
	_ = grpc.SetTrailer(ctx, metadata.Pairs(EchoTrailer, "done"))
	item := dynamicpb.NewMessage(md.Output())
	switch md.Name() {
	case "GetItem":
		id := field(in, "id").String()
		setField(item, "shelf", field(in, "shelf"))
		setField(item, "id", field(in, "id"))
		setField(item, "display_name", protoreflect.ValueOfString("item "+id))
		setField(item, "size", protoreflect.ValueOfInt64(int64(len(id))))
		setField(item, "kind", field(in, "kind"))
		src, dst := field(in, "tags").List(), item.Mutable(item.Descriptor().Fields().ByName("tags")).List()
		for i := range src.Len() {
			dst.Append(src.Get(i))
		}
		if l := in.Descriptor().Fields().ByName("limit"); in.Has(l) {
			setField(item, "limit", in.Get(l))
		}
	case "CreateItem":
		if f := in.Descriptor().Fields().ByName("item"); in.Has(f) {
			proto.Merge(item, in.Get(f).Message().Interface())
		}
		setField(item, "shelf", field(in, "shelf"))
		setField(item, "id", protoreflect.ValueOfString("created"))
	case "UpdateItem", "Echo":
		proto.Merge(item, in)
	case "Fail":
		return nil, status.Error(codes.Code(field(in, "code").Int()), field(in, "message").String())
	default:
		return nil, status.Errorf(codes.Unimplemented, "method %s", md.Name())
	}
	s.report(ctx, md, item)
	return item, nil
}

func (s *EchoServer) list(stream grpc.ServerStream, md protoreflect.MethodDescriptor, in *dynamicpb.Message) error {
	_ = stream.SetHeader(metadata.Pairs(EchoHeader, "echo"))
	stream.SetTrailer(metadata.Pairs(EchoTrailer, "done"))
	count, failAfter := int(field(in, "count").Int()), int(field(in, "fail_after").Int())
	for i := range count {
		if failAfter > 0 && i == failAfter {
			return status.Errorf(codes.NotFound, "no item %d", i)
		}
		item := dynamicpb.NewMessage(md.Output())
		setField(item, "shelf", field(in, "shelf"))
		setField(item, "id", protoreflect.ValueOfString(fmt.Sprint(i)))
		s.report(stream.Context(), md, item)
		if err := stream.SendMsg(item); err != nil {
			return err
		}
	}
	return nil
}

// EchoFile is the compiled testdata/echo.proto.
func EchoFile() (protoreflect.FileDescriptor, error) {
	fd, _, err := echoFile()
	return fd, err
}
